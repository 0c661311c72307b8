"""Training-free feature caching for diffusion transformers (FORA, TaylorSeer, Delta-DiT, FirstBlockCache, TeaCache)."""
