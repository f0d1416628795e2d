"""Weights and stored models, for every architecture, from its spec alone.

    files     the one file layer (npz / safetensors / pth; metadata; atomic writes)
    layouts   load / save / detect / num_classes / describe / freeze / timm_model,
              driven by each model file's `WEIGHTS` spec (funmatch/models/spec.py)
    catalog   published names (collected from the specs) and the local cache
    stored    StoredModel: a workdir's student, an export or a name
    init      where a model's init comes from, and its 'auto' options

Layering: errors/fileio/cache -> models -> weights -> student/predict -> train.
"""
