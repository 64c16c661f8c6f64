"""Evaluation entry points: tokenizer reconstruction (`reconstruction`), MaskGiT sampling to folders (`sampling`, its
files in `sample_files`) and generation metrics over sample folders, `.npz` / `.npy` files or a pipeline
(`generation`); `options`, `resume` and `reports` are what they share. `reconstruction` and `generation` are packages
of one module per concept: `config` (options), `loop` (the evaluation and `main`), `report`, and for generation
`sources` (where the images come from)."""
