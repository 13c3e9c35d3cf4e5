"""modelrun's bundler: the `modelrun` command that makes and inspects model.run files."""
