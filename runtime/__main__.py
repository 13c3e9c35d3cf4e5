"""`python -m runtime ...`: the same as `./model.run ...`."""

from runtime.cli import main

if __name__ == "__main__":
    main()
