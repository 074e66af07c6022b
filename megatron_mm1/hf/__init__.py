"""Hugging Face checkpoint conversion (`mm1 convert`); see docs/convert.md.

mapping.py      megatron <-> HF tensor names, fused-tensor splits, configs
megatron_io.py  read an MM1 checkpoint (any layout) one tensor group at a time
hf_io.py        sharded safetensors, written and read tensor by tensor
export.py       to-hf;  importer.py  from-hf;  verify.py  logits comparison
remote/         configuration_mm1.py + modeling_mm1.py, copied into exported folders
"""
