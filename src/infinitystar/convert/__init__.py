"""Official checkpoint key maps, strict loaders and the `convert` command."""
