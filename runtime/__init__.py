"""modelrun's runtime: everything that runs inside model.run."""
