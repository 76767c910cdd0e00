"""Training the InfinityStar generator: manifests and media (`data`), the latent cache (`features`), packed
targets and the loss (`targets`, `loss`), the trainer (`trainer`), distributed set-up (`distributed`),
checkpoints (`checkpoint`), metrics (`metrics`), and the config file (`config`).
The commands live in `infinitystar.cli.train`.

Imports are lazy so `import infinitystar.train.loss` stays light."""

__all__ = ["train", "Trainer", "load_config", "RunConfig", "extract_features"]


def __getattr__(name):
    if name in ("train", "Trainer"):
        from infinitystar.train import trainer
        return getattr(trainer, name)
    if name in ("load_config", "RunConfig"):
        from infinitystar.train import config
        return getattr(config, name)
    if name == "extract_features":
        from infinitystar.train.features import extract_features
        return extract_features
    raise AttributeError(f"module 'infinitystar.train' has no attribute {name!r}")
