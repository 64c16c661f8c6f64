"""Evaluation entry points: tokenizer reconstruction (`reconstruction`), MaskGiT sampling to folders (`sampling`) and
generation metrics over sample folders, `.npz` files or a pipeline (`generation`)."""
