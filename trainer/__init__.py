"""TDD LoRA trainer (docs/method.md §5): distil a ComfyUI-loadable teacher into a few-step TDD LoRA.

Entry point: ``python trainer/distill.py`` (or :func:`trainer.distill.main` / :func:`trainer.distill.train`).
Only :mod:`trainer.models` imports ComfyUI; everything else is plain torch.
"""
