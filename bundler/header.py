"""The sh header of a model.run: a fixed-size POSIX shell script that checks the platform
and the file, unpacks the runtime payload once into the user's cache (checking its sha256),
and exec's the runtime on its own file. bundler/container.py writes it first and patches it
in place once the sizes are known."""

from __future__ import annotations

from dataclasses import dataclass

from runtime.container import BUILD_ID_PATTERN, HEADER_SIZE, SHA256_PATTERN

# Plain POSIX sh and tools (uname, wc, tail, head, tar, gzip, mkdir, mktemp, mv, rm, id, ls),
# and sha256sum when there is one. The checks run as one { ... } group at the top, so a copy
# cut short inside them is a syntax error rather than a half-run script. The {fields} are
# filled in by render_header.
#
# Where the runtime goes: ${XDG_CACHE_HOME:-~/.cache}/modelrun/<the payload's sha256>/, a
# folder named by what it holds: the payload's bytes are checked against that sha256 while
# they are unpacked (a damaged payload is refused), so a folder only ever holds the runtime
# of its name and no other model.run's runtime is picked up by mistake. When the cache is
# not writable: $TMPDIR/modelrun-<uid>, if it is ours and closed to others (mode 700; a
# folder others could write into might hold anything), else a fresh folder from mktemp -d,
# removed when the runtime exits.
HEADER_TEMPLATE = """\
#!/bin/sh
{{
# model.run: a language model that runs offline on this computer. Made by modelrun.
# Layout: this sh header ({header_size} bytes), the runtime (tar.gz), then a ZIP archive
# with model.gguf, .args and manifest.json (`unzip -l` lists it). This header unpacks the
# runtime once into ${{XDG_CACHE_HOME:-~/.cache}}/modelrun/<its sha256>/ and runs it.
mr_total_size={total_size:<20}
mr_payload_offset={payload_offset:<20}
mr_payload_size={payload_size:<20}
mr_payload_split={payload_split:<20}
mr_build_id={build_id:<64}
mr_payload_sha256={payload_sha256:<64}
mr_system="$(uname -s) $(uname -m)"
if [ "$mr_system" != "Linux x86_64" ]; then
  printf '%s\\n' "modelrun: this file runs on Linux x86_64 only; this machine is $mr_system" >&2
  exit 1
fi
if [ ! -f "$0" ] || [ ! -r "$0" ]; then
  printf '%s\\n' "modelrun: cannot read this file ($0); run it by its path, e.g. ./model.run" >&2
  exit 1
fi
mr_size=$(wc -c <"$0")
mr_size=${{mr_size##* }}
if [ "$mr_size" -lt "$mr_total_size" ]; then
  printf '%s\\n' "modelrun: this file is incomplete, $mr_size of $mr_total_size bytes — download it again" >&2
  exit 1
fi
if [ "$mr_size" -gt "$mr_total_size" ]; then
  printf '%s\\n' "modelrun: this file has $mr_size bytes but was made with $mr_total_size: something was added to it — download it again" >&2
  exit 1
fi
}}

# mr_untar OFFSET SIZE: unpack that part of the payload (a tar.gz) into $mr_tmp.
mr_untar() {{
  tail -c +$((mr_payload_offset + $1 + 1)) "$0" | head -c "$2" | tar -xzf - -C "$mr_tmp"
}}

# mr_untar_all: the payload's two gzip members (split at mr_payload_split: see
# bundler/payload.py) on two cores at once; if that fails, or there is no split, the whole
# payload as one tar.gz (which it also is).
mr_untar_all() {{
  if [ "$mr_payload_split" -gt 0 ]; then
    mr_untar "$mr_payload_split" $((mr_payload_size - mr_payload_split)) &
    mr_second=$!
    mr_untar 0 "$mr_payload_split" && wait "$mr_second" && return 0
    wait "$mr_second"
    rm -rf "$mr_tmp"
    mkdir "$mr_tmp" || return 1
  fi
  mr_untar 0 "$mr_payload_size"
}}

# mr_unpack FOLDER: make FOLDER/<payload sha256>/runtime/runtime exist. The payload is
# unpacked into a temporary folder, its sha256 computed meanwhile, and the folder renamed
# only when that matches: another launch racing this one either finds the finished folder
# or loses the rename and removes its own copy.
mr_unpack() {{
  mr_dir=$1/$mr_payload_sha256
  [ -x "$mr_dir/runtime/runtime" ] && return 0
  mkdir -p "$1" 2>/dev/null || return 1
  mr_tmp=$1/.$mr_payload_sha256.$$.tmp
  rm -rf "$mr_tmp" "$mr_tmp.sum"
  mkdir "$mr_tmp" 2>/dev/null || return 1
  printf '%s\\n' "modelrun: unpacking the runtime into $mr_dir (first launch only)" >&2
  mr_summer=
  if command -v sha256sum >/dev/null 2>&1; then
    tail -c +$((mr_payload_offset + 1)) "$0" | head -c "$mr_payload_size" | sha256sum >"$mr_tmp.sum" &
    mr_summer=$!
  fi
  if ! mr_err=$(mr_untar_all 2>&1); then
    [ -n "$mr_summer" ] && wait "$mr_summer"
    rm -rf "$mr_tmp" "$mr_tmp.sum"
    case $mr_err in
      *"No space left"*|*"Read-only file system"*|*"ermission denied"*)
        printf '%s\\n' "modelrun: cannot unpack the runtime into $1: $(printf '%s' "$mr_err" | head -n 1)" >&2
        return 1 ;;
    esac
    printf '%s\\n' "modelrun: this file is damaged (its runtime does not unpack: $(printf '%s' "$mr_err" | head -n 1)) — download it again" >&2
    exit 1
  fi
  if [ -n "$mr_summer" ]; then
    wait "$mr_summer"
    mr_sum=$(head -c 64 "$mr_tmp.sum" 2>/dev/null)
    rm -f "$mr_tmp.sum"
    if [ "$mr_sum" != "$mr_payload_sha256" ]; then
      rm -rf "$mr_tmp"
      printf '%s\\n' "modelrun: this file is damaged (its runtime does not match its sha256) — download it again" >&2
      exit 1
    fi
  fi
  if [ ! -x "$mr_tmp/runtime/runtime" ]; then
    rm -rf "$mr_tmp"
    printf '%s\\n' "modelrun: this file is damaged (its runtime has no runtime/runtime) — download it again" >&2
    exit 1
  fi
  if [ -d "$mr_dir" ] && [ ! -x "$mr_dir/runtime/runtime" ]; then
    rm -rf "$mr_dir"  # a broken copy (files deleted by hand): replace it
  fi
  if [ ! -d "$mr_dir" ]; then
    mv "$mr_tmp" "$mr_dir" 2>/dev/null
  fi
  rm -rf "$mr_tmp" "$mr_dir/${{mr_tmp##*/}}"
  [ -x "$mr_dir/runtime/runtime" ]
}}

# mr_private_ok FOLDER: FOLDER is a real folder (no symlink), ours, and closed to others.
mr_private_ok() {{
  [ -d "$1" ] && [ ! -L "$1" ] && [ -O "$1" ] || return 1
  case $(ls -ld "$1" 2>/dev/null) in
    drwx------*) return 0 ;;
  esac
  return 1
}}

mr_cache=${{XDG_CACHE_HOME:-$HOME/.cache}}/modelrun
if mr_unpack "$mr_cache"; then
  exec "$mr_dir/runtime/runtime" --container "$0" "$@"
fi
mr_tmp_root=${{TMPDIR:-/tmp}}
mr_private=$mr_tmp_root/modelrun-$(id -u)
mkdir -m 700 "$mr_private" 2>/dev/null
if mr_private_ok "$mr_private"; then
  if mr_unpack "$mr_private"; then
    exec "$mr_dir/runtime/runtime" --container "$0" "$@"
  fi
elif [ -e "$mr_private" ] || [ -L "$mr_private" ]; then
  # another user's, or open to others: not used, and nothing in it trusted
  printf '%s\\n' "modelrun: $mr_private is not a private folder of yours; using a fresh one" >&2
  if mr_fresh=$(mktemp -d "$mr_tmp_root/modelrun-XXXXXXXXXX" 2>/dev/null); then
    trap 'rm -rf "$mr_fresh"' EXIT
    trap 'exit 130' INT TERM HUP
    if mr_unpack "$mr_fresh"; then
      "$mr_dir/runtime/runtime" --container "$0" "$@"
      exit $?
    fi
  fi
fi
printf '%s\\n' "modelrun: cannot unpack the runtime: neither $mr_cache nor $mr_tmp_root is writable; set TMPDIR to a writable folder" >&2
exit 1
"""


@dataclass(frozen=True)
class HeaderValues:
    total_size: int
    payload_offset: int
    payload_size: int
    build_id: str
    payload_sha256: str  # the extraction folder's name, checked while unpacking
    payload_split: int = 0  # where the payload's second gzip member starts; 0: unknown


def render_header(values: HeaderValues) -> bytes:
    """The sh header with its fields filled in, padded to exactly HEADER_SIZE bytes."""
    if not BUILD_ID_PATTERN.fullmatch(values.build_id):
        raise ValueError(f"a build id is 1-64 of [0-9A-Za-z._-], got {values.build_id!r}")
    if not SHA256_PATTERN.fullmatch(values.payload_sha256):
        raise ValueError(f"a payload sha256 is 64 of [0-9a-f], got {values.payload_sha256!r}")
    text = HEADER_TEMPLATE.format(header_size=HEADER_SIZE, total_size=values.total_size,
                                  payload_offset=values.payload_offset,
                                  payload_size=values.payload_size,
                                  payload_split=values.payload_split, build_id=values.build_id,
                                  payload_sha256=values.payload_sha256)
    data = text.encode("utf-8")
    room = HEADER_SIZE - len(data)
    if room < 2:
        raise AssertionError(f"the sh header is {len(data)} bytes, over {HEADER_SIZE}")
    return data + b"#" + b" " * (room - 2) + b"\n"  # never run: every path above exits
