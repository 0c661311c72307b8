"""FluxMusic (ditk.models.mmdit): diffusers' Flux blocks and model as oracles, the paper's parameter counts,
FluxMusic's patch layout, text masking, hook points and the presets."""

import pytest
import torch

from ditk.models.mmdit import (FLUXMUSIC_SIZES, DoubleStreamBlock, FluxMusic, SingleStreamBlock,
                               convert_fluxmusic_state_dict, rope_angles)

D, H, HD, AXES = 48, 3, 16, (4, 6, 6)


def randomize(module, seed=0):
    """Random values in every parameter, the zero-initialised modulations and output layer included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if name.endswith("scale") else 0.0  # RMSNorm gains around 1
            p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))
    return module


def double_to_diffusers(b: DoubleStreamBlock, prefix: str = "") -> dict:
    sd = {}
    for ours, theirs, q, k, v in (("img_attn", "attn.to_", "q", "k", "v"), ("txt_attn", "attn.add_", "q_proj", "k_proj", "v_proj")):
        a = getattr(b, ours)
        for i, name in enumerate((q, k, v)):
            sd[f"{theirs}{name}.weight"] = a.qkv.weight[i * D:(i + 1) * D]
            sd[f"{theirs}{name}.bias"] = a.qkv.bias[i * D:(i + 1) * D]
    sd.update({
        "norm1.linear.weight": b.img_mod.lin.weight, "norm1.linear.bias": b.img_mod.lin.bias,
        "norm1_context.linear.weight": b.txt_mod.lin.weight, "norm1_context.linear.bias": b.txt_mod.lin.bias,
        "attn.norm_q.weight": b.img_attn.norm.query_norm.scale, "attn.norm_k.weight": b.img_attn.norm.key_norm.scale,
        "attn.norm_added_q.weight": b.txt_attn.norm.query_norm.scale,
        "attn.norm_added_k.weight": b.txt_attn.norm.key_norm.scale,
        "attn.to_out.0.weight": b.img_attn.proj.weight, "attn.to_out.0.bias": b.img_attn.proj.bias,
        "attn.to_add_out.weight": b.txt_attn.proj.weight, "attn.to_add_out.bias": b.txt_attn.proj.bias,
        "ff.net.0.proj.weight": b.img_mlp[0].weight, "ff.net.0.proj.bias": b.img_mlp[0].bias,
        "ff.net.2.weight": b.img_mlp[2].weight, "ff.net.2.bias": b.img_mlp[2].bias,
        "ff_context.net.0.proj.weight": b.txt_mlp[0].weight, "ff_context.net.0.proj.bias": b.txt_mlp[0].bias,
        "ff_context.net.2.weight": b.txt_mlp[2].weight, "ff_context.net.2.bias": b.txt_mlp[2].bias,
    })
    return {prefix + k: v.detach().clone() for k, v in sd.items()}


def single_to_diffusers(b: SingleStreamBlock, prefix: str = "") -> dict:
    w, bias = b.linear1.weight, b.linear1.bias
    sd = {"norm.linear.weight": b.modulation.lin.weight, "norm.linear.bias": b.modulation.lin.bias,
          "proj_mlp.weight": w[3 * D:], "proj_mlp.bias": bias[3 * D:],
          "proj_out.weight": b.linear2.weight, "proj_out.bias": b.linear2.bias,
          "attn.norm_q.weight": b.norm.query_norm.scale, "attn.norm_k.weight": b.norm.key_norm.scale}
    for i, name in enumerate("qkv"):
        sd[f"attn.to_{name}.weight"] = w[i * D:(i + 1) * D]
        sd[f"attn.to_{name}.bias"] = bias[i * D:(i + 1) * D]
    return {prefix + k: v.detach().clone() for k, v in sd.items()}


def rope_for_diffusers(ids):
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    return FluxPosEmbed(theta=10000, axes_dim=list(AXES))(ids)


def joint_inputs(n=2, l_txt=5, l_img=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    img, txt, vec = (torch.randn(n, l_img, D, generator=g), torch.randn(n, l_txt, D, generator=g),
                     torch.randn(n, D, generator=g))
    ids = torch.cat([torch.zeros(l_txt, 3), torch.stack([torch.zeros(l_img), torch.arange(l_img) // 4,
                                                         torch.arange(l_img) % 4], 1).float()])
    return img, txt, vec, ids


def test_double_stream_block_matches_diffusers_flux_transformer_block():
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

    ours = randomize(DoubleStreamBlock(D, H, 4.0, qkv_bias=True)).eval()
    theirs = FluxTransformerBlock(D, H, HD).eval()
    theirs.load_state_dict(double_to_diffusers(ours), strict=True)
    img, txt, vec, ids = joint_inputs()
    with torch.no_grad():
        img_a, txt_a = ours(img, txt, vec, rope_angles(ids, AXES, 10000.0))
        txt_b, img_b = theirs(img, txt, vec, image_rotary_emb=rope_for_diffusers(ids))
    assert (img_a - img).abs().max() > 0.1 and (txt_a - txt).abs().max() > 0.1  # the block does something
    torch.testing.assert_close(img_a, img_b, rtol=0, atol=1e-5)
    torch.testing.assert_close(txt_a, txt_b, rtol=0, atol=1e-5)


def test_single_stream_block_matches_diffusers_flux_single_transformer_block():
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

    ours = randomize(SingleStreamBlock(D, H, 4.0), seed=3).eval()
    theirs = FluxSingleTransformerBlock(D, H, HD, mlp_ratio=4.0).eval()
    theirs.load_state_dict(single_to_diffusers(ours), strict=True)
    img, txt, vec, ids = joint_inputs(seed=4)
    with torch.no_grad():
        out = ours(torch.cat([txt, img], 1), vec, rope_angles(ids, AXES, 10000.0))
        txt_b, img_b = theirs(img, txt, vec, image_rotary_emb=rope_for_diffusers(ids))
    assert (out[:, 5:] - img).abs().max() > 0.1
    torch.testing.assert_close(out, torch.cat([txt_b, img_b], 1), rtol=0, atol=1e-5)


def tiny_model(**kw):
    args = dict(input_size=8, frames=12, patch_size=2, in_channels=2, hidden_size=D, num_heads=H, depth_double=2,
                depth_single=2, axes_dim=AXES, context_dim=10, pooled_dim=7)
    args.update(kw)
    return FluxMusic(**args)


def model_inputs(n=2, l_txt=5, f=8, t=12, seed=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2, f, t, generator=g), torch.tensor([0.3, 0.85])[:n], torch.randn(n, l_txt, 10, generator=g),
            torch.randn(n, 7, generator=g))


def test_whole_model_matches_diffusers_flux_transformer_2d_model():
    """Embeddings (time x 1000 sinusoid, pooled text, context, patches), RoPE ids, both block kinds and the output
    layer against FluxTransformer2DModel fed FluxMusic's token layout and position ids."""
    from diffusers import FluxTransformer2DModel

    ours = randomize(tiny_model(), seed=7).eval()
    theirs = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=HD,
                                    num_attention_heads=H, joint_attention_dim=10, pooled_projection_dim=7,
                                    guidance_embeds=False, axes_dims_rope=AXES).eval()
    sd = {}
    for i in range(2):
        sd.update(double_to_diffusers(ours.blocks[i], f"transformer_blocks.{i}."))
        sd.update(single_to_diffusers(ours.blocks[2 + i], f"single_transformer_blocks.{i}."))
    shift, scale = ours.final_layer.adaLN_modulation[1].weight.chunk(2), ours.final_layer.adaLN_modulation[1].bias.chunk(2)
    pairs = {
        "time_text_embed.timestep_embedder.linear_1": ours.time_in.in_layer,
        "time_text_embed.timestep_embedder.linear_2": ours.time_in.out_layer,
        "time_text_embed.text_embedder.linear_1": ours.vector_in.in_layer,
        "time_text_embed.text_embedder.linear_2": ours.vector_in.out_layer,
        "context_embedder": ours.txt_in, "x_embedder": ours.img_in, "proj_out": ours.final_layer.linear,
    }
    for name, lin in pairs.items():
        sd[f"{name}.weight"], sd[f"{name}.bias"] = lin.weight.detach(), lin.bias.detach()
    sd["norm_out.linear.weight"] = torch.cat([shift[1], shift[0]]).detach()  # diffusers orders (scale, shift)
    sd["norm_out.linear.bias"] = torch.cat([scale[1], scale[0]]).detach()
    theirs.load_state_dict(sd, strict=True)

    x, t, context, pooled = model_inputs()
    ids = ours.position_ids(5, 8, 12, x.device)
    with torch.no_grad():
        a = ours(x, t * 1000, context=context, pooled=pooled)
        b = theirs(ours.patchify(x), context, pooled, t, img_ids=ids[5:], txt_ids=ids[:5]).sample
    assert a.shape == x.shape and a.abs().max() > 0.1
    torch.testing.assert_close(a, ours.unpatchify(b, 8, 12), rtol=0, atol=2e-5)


def test_patch_layout_is_fluxmusic_time_major_c_pt_pf():
    """FluxMusic: latent (time h, freq w) -> 'b c (h ph) (w pw) -> b (h w) (c ph pw)'; ditk's (freq, time) input must
    give the same tokens, and the position ids (0, time, freq)."""
    m = tiny_model()
    x = torch.arange(2 * 2 * 8 * 12, dtype=torch.float32).reshape(2, 2, 8, 12)  # (N, C, F, T)
    lat = x.transpose(2, 3)  # FluxMusic's (N, C, T, F)
    n, c, h, w = lat.shape
    ref = lat.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)
    assert torch.equal(m.patchify(x), ref)
    assert torch.equal(m.unpatchify(m.patchify(x), 8, 12), x)
    ids = m.position_ids(3, 8, 12, "cpu")
    assert ids[:3].abs().sum() == 0 and ids[3 + 5].tolist() == [0, 1, 1]  # token 5: time 1, freq 1 (4 freq patches)


def test_text_mask_equals_dropping_the_padding_tokens():
    m = randomize(tiny_model(mask_text=True), seed=9).eval()
    x, t, context, pooled = model_inputs(n=1)
    mask = torch.tensor([[True, True, True, False, False]])
    with torch.no_grad():
        masked = m(x, t * 1000, context=context, pooled=pooled, context_mask=mask)
        short = m(x, t * 1000, context=context[:, :3], pooled=pooled, context_mask=mask[:, :3])
        unmasked = m(x, t * 1000, context=context, pooled=pooled)
    torch.testing.assert_close(masked, short, rtol=1e-5, atol=1e-5)
    assert (masked - unmasked).abs().max() > 1e-3


def test_new_model_predicts_zero_and_any_width_works():
    m = tiny_model()
    x, t, context, pooled = model_inputs()
    assert torch.equal(m(x, t, context=context, pooled=pooled), torch.zeros_like(x))  # adaLN-Zero + zero output
    wide = torch.randn(2, 2, 8, 40)
    assert randomize(m)(wide, t, context=context, pooled=pooled).shape == wide.shape  # RoPE: no fixed grid


def test_hook_points_see_the_joint_sequence():
    from ditk import hooks

    m = randomize(tiny_model(), seed=2).eval()
    x, t, context, pooled = model_inputs()
    seen = []
    with torch.no_grad(), hooks.attach(m, {"blocks.*.attn.v_hook": lambda mod, a, out: seen.append(out.shape),
                                           "blocks.3.attn.out_hook": lambda mod, a, out: torch.zeros_like(out)}):
        out = m(x, t, context=context, pooled=pooled)
    assert len(seen) == 4 and seen[0] == (2, H, 5 + 24, HD)  # 5 text + 4x6 music tokens, every block
    assert not torch.equal(out, m(x, t, context=context, pooled=pooled))  # the replacement took effect


def test_official_checkpoint_names_convert():
    m = tiny_model()
    official = {}
    for k, v in m.state_dict().items():
        if k.startswith("blocks."):
            i, rest = k[7:].split(".", 1)
            k = f"double_blocks.{i}.{rest}" if int(i) < 2 else f"single_blocks.{int(i) - 2}.{rest}"
        official[k] = v
    assert any(k.startswith("single_blocks.1.linear1") for k in official)
    m.load_state_dict(convert_fluxmusic_state_dict(official, depth_double=2), strict=True)


@pytest.mark.parametrize("size,params", [("small", 142.3), ("base", 473.9), ("large", 840.6), ("giant", 2109.9)])
def test_paper_presets_build_the_paper_sizes(size, params):
    """Paper Table 1 parameter counts (142.3M / 473.9M / 840.6M / 2109.9M, truncated to 0.1M), on the meta device."""
    from ditk.build import build_model
    from ditk.config import resolve

    cfg = resolve(f"fluxmusic-{size}", allow_missing=("data", "conditioner", "autoencoder"))
    depth_double, depth_single, width, axes = FLUXMUSIC_SIZES[size]
    assert (cfg.model.depth_double, cfg.model.depth_single, cfg.model.hidden_size) == (depth_double, depth_single, width)
    assert tuple(cfg.model.axes_dim) == axes
    assert cfg.objective.name == "rectified-flow" and cfg.objective.time_scale == 1000
    with torch.device("meta"):
        model = build_model(cfg)
    assert 0 <= sum(p.numel() for p in model.parameters()) / 1e6 - params < 0.1
