import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel

import modeling_actprior as ap


def _batch(model, b=4, width=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    dim_mask = torch.zeros(b, c.max_action_dim, dtype=torch.bool)
    dim_mask[:, :width] = True
    hist_mask = torch.ones(b, c.history_length, dtype=torch.bool)
    hist_mask[0, :3] = False  # an episode start
    act_mask = torch.ones(b, c.chunk_size, dtype=torch.bool)
    act_mask[1, -2:] = False  # an episode end
    return dict(
        history=torch.randn(b, c.history_length, c.max_action_dim, generator=g) * dim_mask[:, None],
        actions=torch.randn(b, c.chunk_size, c.max_action_dim, generator=g) * dim_mask[:, None],
        history_mask=hist_mask, action_mask=act_mask, dim_mask=dim_mask,
        noise=torch.randn(b, c.chunk_size, c.max_action_dim, generator=g),
        timesteps=torch.rand(b, generator=g),
    )


def _loss_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch, generator=torch.Generator().manual_seed(3))
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_padded_dims_and_padded_steps_never_contribute_to_loss_or_gradients(tiny_prior):
    model = tiny_prior.train()
    batch = _batch(model)
    out, grads = _loss_and_grads(model, batch)
    junk = {k: v.clone() for k, v in batch.items()}
    pad_dims = ~batch["dim_mask"][:, None, :]
    junk["history"] = torch.where(pad_dims, torch.full_like(junk["history"], 1e3), junk["history"])
    junk["actions"] = torch.where(pad_dims, torch.full_like(junk["actions"], -7.0), junk["actions"])
    junk["noise"] = torch.where(pad_dims, torch.full_like(junk["noise"], 5.0), junk["noise"])
    junk["history"][0, :3] = 99.0  # masked history steps
    junk["actions"][1, -2:] = 42.0  # masked chunk steps (their target may be anything)
    out2, grads2 = _loss_and_grads(model, junk)
    torch.testing.assert_close(out2.loss, out.loss, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], rtol=0, atol=0, msg=name)
    assert torch.all(out.velocity[pad_dims.expand_as(out.velocity)] == 0)


def test_loss_is_flow_matching_plus_beta_kl(tiny_prior):
    model = tiny_prior.train()
    out = model(**_batch(model), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.loss, out.flow_loss + model.config.kl_weight * out.kl_loss)
    assert out.kl_loss > 0 and out.flow_loss > 0


def test_kl_of_the_standard_normal_is_zero():
    assert ap.modeling_actprior.gaussian_kl(torch.zeros(2, 5), torch.zeros(2, 5)).abs().max() == 0


@pytest.mark.parametrize("density", ["beta", "uniform", "logit_normal"])
def test_time_densities_stay_in_range_and_follow_their_shape(density):
    model = ap.ActionPriorModel(ap.ActionPriorConfig.from_preset("tiny", time_sampling=density))
    t = model.sample_time(20000, "cpu", torch.Generator().manual_seed(0))
    assert t.min() >= model.config.time_min and t.max() <= model.config.time_max
    expected_mean = {"beta": 1.5 / 2.5, "uniform": 0.5, "logit_normal": 0.5}[density]
    assert abs(t.mean().item() - expected_mean) < 0.01
    if density == "beta":  # Beta(1.5, 1) leans towards noise (t near 1), as in pi0
        assert (t > 0.5).float().mean() > 0.6


def test_a_prior_trained_on_one_motion_samples_that_motion():
    """Two histories, two futures: a few hundred steps make the sampler reproduce each future from its history."""
    torch.manual_seed(0)
    model = ap.ActionPriorModel(ap.ActionPriorConfig.from_preset("tiny", chunk_size=4, history_length=4,
                                                                   max_action_dim=4, kl_weight=0.0))
    up, down = torch.linspace(-0.8, -0.2, 8), torch.linspace(0.8, 0.2, 8)
    hist = torch.stack([up[:4], down[:4]])[..., None].expand(-1, -1, 4).contiguous()
    fut = torch.stack([up[4:], down[4:]])[..., None].expand(-1, -1, 4).contiguous()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        loss = model(hist.repeat(16, 1, 1), fut.repeat(16, 1, 1), generator=g).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    z = model.encode(hist).mean
    sample = model.sample_actions(z, generator=torch.Generator().manual_seed(1))
    assert (sample - fut).abs().mean() < 0.1, (sample - fut).abs().mean()


def test_save_load_gives_bit_identical_weights_and_identical_samples(tiny_prior, tmp_path):
    tiny_prior.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert {"action_normalizer.json", "scheduler", "configuration_actprior.py", "modeling_actprior.py"} <= files
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is ap.ActionPriorModel
    ref = tiny_prior.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ref[k]), k
    hist = np.random.default_rng(0).normal(size=(5, 8))
    a = tiny_prior.predict_actions(hist, "kuka_iiwa", generator=torch.Generator().manual_seed(7))
    b = loaded.predict_actions(hist, "kuka_iiwa", generator=torch.Generator().manual_seed(7))
    assert a.shape == (8, 8)
    assert torch.equal(a, b)


def test_scheduler_is_saved_with_the_checkpoint_and_replaceable_at_sampling(tiny_prior, tmp_path):
    tiny_prior.scheduler = ap.FlowMatchingActionScheduler(num_inference_steps=4, solver="heun")
    tiny_prior.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert loaded.scheduler.config.solver == "heun" and loaded.scheduler.config.num_inference_steps == 4
    z = torch.zeros(2, loaded.config.latent_dim)
    heun = loaded.sample_actions(z, generator=torch.Generator().manual_seed(0))
    euler = loaded.sample_actions(z, generator=torch.Generator().manual_seed(0),
                                  scheduler=ap.FlowMatchingActionScheduler(solver="euler"))
    assert not torch.allclose(heun, euler)


def test_config_round_trips_through_auto_config(tmp_path):
    cfg = ap.ActionPriorConfig.from_preset("small", chunk_size=12)
    cfg.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is ap.ActionPriorConfig and loaded.chunk_size == 12 and loaded.hidden_size == 128


def test_remote_code_export_loads_where_the_package_cannot_be_imported(tiny_prior, tmp_path):
    tiny_prior.save_pretrained(tmp_path / "ckpt")
    hist = np.random.default_rng(0).normal(size=(3, 4))
    expected = tiny_prior.predict_actions(hist, "sawyer", generator=torch.Generator().manual_seed(5))
    np.save(tmp_path / "hist.npy", hist)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["modeling_actprior"] = None  # any import of the installed package now fails
        import numpy as np, torch
        from transformers import AutoModel
        try:
            import modeling_actprior
            raise SystemExit("package still importable")
        except ImportError:
            pass
        m = AutoModel.from_pretrained({str(tmp_path / 'ckpt')!r}, trust_remote_code=True)
        assert "transformers_modules" in type(m).__module__, type(m).__module__
        out = m.predict_actions(np.load({str(tmp_path / 'hist.npy')!r}), "sawyer",
                                generator=torch.Generator().manual_seed(5))
        np.save({str(tmp_path / 'out.npy')!r}, out.numpy())
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected.numpy())


def test_exported_code_files_do_not_import_the_installed_package(tiny_prior, tmp_path):
    tiny_prior.save_pretrained(tmp_path)
    import ast

    for name in os.listdir(tmp_path):
        if name.endswith(".py"):
            for node in ast.walk(ast.parse((tmp_path / name).read_text())):
                if isinstance(node, ast.Import):
                    assert not any(a.name.split(".")[0] == "modeling_actprior" for a in node.names), name
                elif isinstance(node, ast.ImportFrom):
                    assert node.level == 1 or (node.module or "").split(".")[0] != "modeling_actprior", name


def test_safetensors_is_the_only_format_written(tiny_prior, tmp_path):
    with pytest.raises(ValueError, match="safetensors only"):
        tiny_prior.save_pretrained(tmp_path, safe_serialization=False)
    tiny_prior.save_pretrained(tmp_path)
    assert load_file(tmp_path / "model.safetensors")


def test_history_longer_than_configured_says_how_many_to_pass(tiny_prior):
    with pytest.raises(ValueError, match="history_length=6. Pass the last 6 actions"):
        tiny_prior.predict_actions(np.zeros((9, 4)), "sawyer")


def test_empty_history_at_episode_start_is_allowed(tiny_prior):
    out = tiny_prior.predict_actions(np.zeros((0, 4)), "sawyer", generator=torch.Generator().manual_seed(0))
    assert out.shape == (8, 4) and torch.isfinite(out).all()


def test_wrong_action_width_unknown_embodiment_and_nan_are_refused(tiny_prior):
    with pytest.raises(ValueError, match=r"\(steps, 4\)"):
        tiny_prior.predict_actions(np.zeros((3, 7)), "sawyer")
    with pytest.raises(ap.UnknownEmbodimentError, match="kuka_iiwa, sawyer"):
        tiny_prior.predict_actions(np.zeros((3, 7)), "unitree_h1")
    bad = np.zeros((3, 4))
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        tiny_prior.predict_actions(bad, "sawyer")
    batch = _batch(tiny_prior)
    batch["actions"][0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="actions contains NaN or inf"):
        tiny_prior(**batch)
    batch = _batch(tiny_prior)
    batch["actions"] = batch["actions"][..., :10]
    with pytest.raises(ValueError, match="max_action_dim=32"):
        tiny_prior(**batch)


def test_impossible_config_values_are_refused():
    with pytest.raises(ValueError, match="latent_dim must be a positive"):
        ap.ActionPriorConfig(latent_dim=0)
    with pytest.raises(ValueError, match="time_sampling must be one of"):
        ap.ActionPriorConfig(time_sampling="cosine")
    with pytest.raises(ValueError, match="divisible"):
        ap.ActionPriorConfig(hidden_size=30, encoder_heads=4)
    with pytest.raises(ValueError, match="Unknown ActionPriorConfig preset"):
        ap.ActionPriorConfig.from_preset("huge")


def test_checkpoint_from_a_newer_config_version_names_that_version():
    with pytest.raises(ValueError, match="version 99"):
        ap.ActionPriorConfig(actprior_config_version=99)


def test_prior_without_statistics_explains_how_to_attach_them():
    model = ap.ActionPriorModel(ap.ActionPriorConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match="no action normalizer"):
        model.predict_actions(np.zeros((2, 4)), "sawyer")


def test_presets_grow_from_tiny_to_base():
    sizes = [ap.ActionPriorModel(ap.ActionPriorConfig.from_preset(p)).num_parameters() for p in ("tiny", "small", "base")]
    assert sizes[0] < 300_000 < sizes[1] < sizes[2]
    base = ap.ActionPriorConfig.from_preset("base")
    assert base.encoder_layers == 4 and base.decoder_layers == 4


def test_current_state_reaches_the_latent_only_when_configured():
    torch.manual_seed(0)
    with_state = ap.ActionPriorModel(ap.ActionPriorConfig.from_preset("tiny", max_state_dim=5)).eval()
    hist = torch.randn(2, 16, 32)
    a = with_state.encode(hist, state=torch.zeros(2, 5)).mean
    b = with_state.encode(hist, state=torch.ones(2, 5)).mean
    assert not torch.allclose(a, b)
    without = ap.ActionPriorModel(ap.ActionPriorConfig.from_preset("tiny")).eval()
    with pytest.raises(ValueError, match=r"reads no state \(max_state_dim=0\)"):
        without.encode(hist, state=torch.zeros(2, 5))  # silently ignoring it would hide a config mistake


def test_a_state_of_the_wrong_shape_or_with_nan_is_refused():
    model = ap.ActionPriorModel(ap.ActionPriorConfig.from_preset("tiny", max_state_dim=5)).eval()
    batch = _batch(model, b=2)
    with pytest.raises(ValueError, match=r"state must be \(batch=2, max_state_dim=5\).*\(2, 3\)"):
        model(**batch, state=torch.zeros(2, 3))
    state = torch.zeros(2, 5)
    state[1, 4] = float("nan")
    with pytest.raises(ValueError, match=r"state contains NaN or inf \(first at index \(1, 4\)"):
        model(**batch, state=state)
    assert torch.isfinite(model(**batch, state=torch.zeros(2, 5)).loss)


def test_truncated_or_tampered_weights_are_refused_with_the_file_named(tiny_prior, tmp_path):
    tiny_prior.save_pretrained(tmp_path / "ok")
    weights = tmp_path / "ok" / "model.safetensors"
    data = weights.read_bytes()

    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors does not match the sha256"):
        AutoModel.from_pretrained(tmp_path / "ok")

    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # a weight value, not the header: only the checksum can tell
    weights.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="truncated or modified"):
        AutoModel.from_pretrained(tmp_path / "ok")

    (tmp_path / "ok" / "weights_sha256.json").unlink()  # without checksums, safetensors' own checks still name it
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot be read as safetensors"):
        AutoModel.from_pretrained(tmp_path / "ok")


def test_unknown_config_fields_are_refused_with_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['latent_dims'\].*Known fields: .*latent_dim"):
        ap.ActionPriorConfig(latent_dims=8)
    ap.ActionPriorConfig.from_preset("tiny").save_pretrained(tmp_path)
    import json

    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["decoder_kind"] = "transformer"  # a field from some other release
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="decoder_kind"):
        AutoConfig.from_pretrained(tmp_path)
