"""The MM1 model: CLIP ViT encoder -> connector -> megatron-core decoder LLM."""
