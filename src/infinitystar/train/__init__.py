"""Training: one harness (`harness`: resume, seeding, optimizer and LR schedule, precision, checkpoints, metrics,
`fit`) and the trainers built on it, each saying only what differs:

    trainer             the InfinityStar generator (packed sequences, torchrun / FSDP2), from `config.RunConfig`
    tokenizer           the video tokenizer (continuous VAE, bitwise tokenizer by knowledge inheritance)
    infinity_tokenizer  the 2-D Infinity image tokenizer
    infinity            the Infinity text-to-image transformer

Their pieces: run configs and their loading (`config`), manifests and media (`data`), the latent cache
(`features`), targets and losses (`targets`, `loss`, `infinity_targets`, `tokenizer_loss`), the tokenizers' clips
(`tokenizer_data`), distributed set-up (`distributed`), checkpoints (`checkpoint`), metrics (`metrics`) and the
model-folder export (`export`). The commands live in `infinitystar.cli.train`.
"""
