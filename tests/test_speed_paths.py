"""The fast paths of issue #8 compute what the plain paths compute.

* Sampling builds the decoder's conditioning (time embedding, every block's modulation) for all flow steps in one
  batched pass; it must give the chunk that evaluating the velocity field step by step gives.
* Stage-2 training reuses the frozen history encoder's posterior as the teacher's when the two are provably the same
  encoder; losses and gradients must equal those of running the teacher, and any difference in weights must switch
  the reuse off.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import modeling_actprior as ap
from modeling_actprior import ActionPriorProcessor, FlowMatchingActionScheduler, VLAWithPriorForAction
from modeling_actprior.modeling_actprior import sinusoidal_time_embedding


def _decoder(chunk=8, seed=0, preset="tiny"):
    """A decoder whose gates and modulations are not zero (at init every block is the identity, which would hide
    a wrong modulation)."""
    torch.manual_seed(seed)
    prior = ap.ActionPriorModel(ap.ActionPriorConfig.from_preset(preset, chunk_size=chunk)).eval()
    with torch.no_grad():
        for p in prior.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return prior


def _reference_velocity(decoder, x_t, t, z, dim_mask):
    """The velocity field as first written: every part recomputed from ``t`` and ``z`` at each call, through the
    modules themselves."""
    dm = dim_mask.to(x_t.dtype)
    b = x_t.shape[0]
    latent = decoder.latent_mlp(z)
    h = decoder.x_in(torch.cat([(x_t * dm[:, None, :]).reshape(b, -1), dm], dim=-1)) + latent
    cond = F.silu(decoder.time_mlp(sinusoidal_time_embedding(t, decoder.config.time_embedding_dim)) + latent)
    for block in decoder.blocks:
        scale, shift, gate = block.modulation(cond).chunk(3, dim=-1)
        h = h + gate * block.mlp(block.norm(h) * (1 + scale) + shift)
    v = decoder.out(decoder.norm_out(h)).reshape(b, decoder.config.chunk_size, decoder.config.max_action_dim)
    return v * dm[:, None, :]


def _masks(b=3):
    dim_mask = torch.zeros(b, 32, dtype=torch.bool)
    for i, width in enumerate([4, 7, 32][:b]):
        dim_mask[i, :width] = True
    return dim_mask


@pytest.mark.parametrize("solver,steps", [("euler", 10), ("euler", 3), ("heun", 5)])
def test_precomputed_conditioning_samples_what_step_by_step_evaluation_samples(solver, steps):
    prior = _decoder()
    g = torch.Generator().manual_seed(0)
    z, noise, dim_mask = torch.randn(3, prior.config.latent_dim, generator=g), torch.randn(3, 8, 32, generator=g), _masks()
    fast = prior.sample_actions(z, dim_mask, steps, noise=noise, scheduler=FlowMatchingActionScheduler(solver=solver))

    run = FlowMatchingActionScheduler(solver=solver).for_run(steps)
    x = noise * dim_mask[:, None, :]
    with torch.no_grad():
        for t in run.timesteps:
            v = _reference_velocity(prior.decoder, x, t.expand(3), z, dim_mask)
            x = run.step(v, t, x).prev_sample
    x = x * dim_mask[:, None, :]
    torch.testing.assert_close(fast, x, atol=1e-6, rtol=1e-6)
    assert torch.all(fast[0, :, 4:] == 0) and torch.all(fast[1, :, 7:] == 0)


def test_decoder_forward_matches_the_original_formula_and_keeps_its_gradients():
    prior = _decoder()
    decoder = prior.decoder
    g = torch.Generator().manual_seed(1)
    x_t, t = torch.randn(3, 8, 32, generator=g), torch.rand(3, generator=g)
    z = torch.randn(3, prior.config.latent_dim, generator=g, requires_grad=True)
    dim_mask = _masks()
    v = decoder(x_t, t, z, dim_mask)
    ref = _reference_velocity(decoder, x_t, t, z, dim_mask)
    torch.testing.assert_close(v, ref, atol=1e-6, rtol=1e-6)
    (gz,) = torch.autograd.grad(v.square().sum(), z)
    (gz_ref,) = torch.autograd.grad(ref.square().sum(), z)
    torch.testing.assert_close(gz, gz_ref, atol=1e-5, rtol=1e-5)


def test_conditioning_for_all_steps_at_once_equals_one_step_at_a_time():
    prior = _decoder()
    decoder = prior.decoder
    z, dim_mask = torch.randn(2, prior.config.latent_dim), _masks(2)
    times = FlowMatchingActionScheduler().for_run(10).timesteps
    with torch.no_grad():
        steps = decoder.conditioning(z, times[:, None], dim_mask).steps()
        assert len(steps) == 10
        x = torch.randn(2, 8, 32)
        for t, c in zip(times, steps):
            torch.testing.assert_close(decoder(x, conditioning=c), decoder(x, t.expand(2), z, dim_mask),
                                       atol=1e-6, rtol=1e-6)


def test_batch_one_step_modulations_are_contiguous_and_hold_each_steps_values():
    """At batch 1 the per-step scale / shift become the layer norms' weight and bias: contiguous, so the layer norm
    does not copy them on every step; and each is that step's row of the modulation."""
    prior = _decoder()
    decoder = prior.decoder
    z, dim_mask = torch.randn(1, prior.config.latent_dim), _masks(1)
    times = FlowMatchingActionScheduler().for_run(10).timesteps
    with torch.no_grad():
        c = decoder.conditioning(z, times[:, None], dim_mask)
        per_step = c.step_modulations()
    assert len(per_step) == 10 and len(per_step[0]) == len(decoder.blocks)
    for s, blocks in enumerate(per_step):
        for (one_plus_scale, shift, gate), built in zip(blocks, c.modulation):
            for got, full in zip((one_plus_scale, shift, gate), built):
                assert got.shape == (decoder.config.decoder_hidden_size,) and got.is_contiguous()
                torch.testing.assert_close(got, full[s, 0], rtol=0, atol=0)


def test_sampling_calls_the_decoder_once_per_step_and_returns_an_ordinary_tensor():
    prior = _decoder()
    calls = []
    hook = prior.decoder.register_forward_hook(lambda *a: calls.append(1))
    out = prior.sample_actions(torch.randn(1, prior.config.latent_dim), num_inference_steps=7)
    hook.remove()
    assert len(calls) == 7
    assert not out.is_inference()
    out[:, 0] = 0.0  # callers may write into the chunk


def test_a_wrapped_linear_layer_is_still_called_as_a_module():
    """Plain layers are applied through their parameters; anything else (a LoRA or quantized wrapper) keeps its
    own forward."""
    prior = _decoder()
    decoder = prior.decoder
    z, dim_mask, noise = torch.randn(1, prior.config.latent_dim), _masks(1), torch.randn(1, 8, 32)
    before = prior.sample_actions(z, dim_mask, 4, noise=noise)

    class Doubled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return 2 * self.inner(x)

    decoder.blocks[0].mlp[3] = Doubled(decoder.blocks[0].mlp[3])
    after = prior.sample_actions(z, dim_mask, 4, noise=noise)
    assert not torch.allclose(before, after)


def test_scheduler_steps_from_its_own_grid_whatever_tensor_holds_the_time():
    run = FlowMatchingActionScheduler().for_run(4)
    x, v = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    out = run.step(v, run.timesteps[0], x)
    torch.testing.assert_close(out.prev_sample, x - 0.25 * v)
    torch.testing.assert_close(out.pred_original_sample, x - 1.0 * v)
    prev, pred = run.step(v, 0.75, x, return_dict=False)
    torch.testing.assert_close(prev, x - 0.25 * v)
    torch.testing.assert_close(pred, x - 0.75 * v)


@pytest.mark.parametrize("batch,preset", [(1, "tiny"), (1, "small"), (3, "tiny")])
def test_the_fused_euler_sampler_gives_the_scheduler_loops_chunk(batch, preset):
    """Euler on plain layers runs fused (each step one velocity and one addcmul on the flattened chunk); a forward
    hook on the decoder forces the scheduler's own loop, step by step through ``decoder(...)`` and ``run.step``."""
    prior = _decoder(chunk=8, preset=preset)
    g = torch.Generator().manual_seed(4)
    z, noise = torch.randn(batch, prior.config.latent_dim, generator=g), torch.randn(batch, 8, 32, generator=g)
    dim_mask = _masks(batch) if batch > 1 else torch.arange(32)[None] < 5  # batch 1: one robot, 5 real dims
    fused = prior.sample_actions(z, dim_mask, 10, noise=noise)
    calls = []
    hook = prior.decoder.register_forward_hook(lambda *a: calls.append(1))
    loop = prior.sample_actions(z, dim_mask, 10, noise=noise)
    hook.remove()
    assert len(calls) == 10  # the hooked run did go through the module, once per step
    torch.testing.assert_close(fused, loop, atol=1e-6, rtol=1e-6)
    assert torch.all(fused[~dim_mask[:, None, :].expand_as(fused)] == 0)
    assert not fused.is_inference() and fused.shape == (batch, 8, 32)


def test_the_time_grids_conditioning_is_cached_and_follows_the_time_mlps_weights():
    prior = _decoder()
    decoder = prior.decoder
    times = FlowMatchingActionScheduler().for_run(10).timestep_values
    with torch.inference_mode():
        first = decoder.grid_time_condition(times, torch.float32, "cpu")
        assert decoder.grid_time_condition(times, torch.float32, "cpu") is first  # cached
        expected = decoder.time_condition(torch.tensor(times)[:, None])
    torch.testing.assert_close(first, expected)
    z, noise = torch.randn(1, prior.config.latent_dim), torch.randn(1, 8, 32)
    before = prior.sample_actions(z, num_inference_steps=10, noise=noise)
    with torch.no_grad():
        decoder.time_mlp[0].weight.mul_(1.5)  # in place: the version counter moves
    with torch.inference_mode():
        again = decoder.grid_time_condition(times, torch.float32, "cpu")
        torch.testing.assert_close(again, decoder.time_condition(torch.tensor(times)[:, None]))
        assert not torch.allclose(again, first)
        five = decoder.grid_time_condition(times[:5], torch.float32, "cpu")  # another grid
        assert five.shape[0] == 5
    assert not torch.allclose(prior.sample_actions(z, num_inference_steps=10, noise=noise), before)


def test_euler_step_sizes_are_the_grids_intervals_and_heun_has_none():
    run = FlowMatchingActionScheduler(t_max=1.0, t_min=0.2).for_run(4)
    sizes = run.euler_step_sizes()
    assert len(sizes) == 4 and all(s < 0 for s in sizes)
    assert sum(sizes) == pytest.approx(-0.8)
    assert run.timestep_values == pytest.approx([1.0, 0.8, 0.6, 0.4])
    assert FlowMatchingActionScheduler(solver="heun").for_run(4).euler_step_sizes() is None


# ------------------------------------------------------------------------------------------ Stage 2: the teacher
def _batch(vla, b=3, seed=0):
    rng = np.random.default_rng(seed)
    proc = ActionPriorProcessor.from_config(vla.config, vla.normalizer, instructions=["open the drawer"])
    images = [rng.integers(0, 255, (40, 40, 3), dtype=np.uint8) for _ in range(b)]
    hist = [rng.normal(size=(k, 4)) for k in (4, 2, 0)[:b]]
    inputs = dict(proc(images=images, text=["open the drawer"] * b, history=hist, embodiment="sawyer"))
    g = torch.Generator().manual_seed(seed)
    inputs.update(actions=torch.randn(b, 8, 32, generator=g) * inputs["dim_mask"][:, None],
                  noise=torch.randn(b, 8, 32, generator=g), timesteps=torch.rand(b, generator=g))
    return inputs


def _step(vla, batch, reuse: bool, monkeypatch):
    """Loss parts and gradients of one training forward, with the teacher reused or run."""
    calls = []
    hook = vla.teacher.register_forward_hook(lambda *a: calls.append(1))
    with monkeypatch.context() as m:
        if not reuse:
            m.setattr(VLAWithPriorForAction, "teacher_is_history_encoder", lambda self: False)
        vla.zero_grad(set_to_none=True)
        out = vla(**batch, step=0, generator=torch.Generator().manual_seed(3))
        out.loss.backward()
    hook.remove()
    grads = {n: p.grad.clone() for n, p in vla.named_parameters() if p.grad is not None}
    return out, grads, len(calls)


def test_reusing_the_frozen_history_encoder_as_teacher_gives_identical_losses_and_gradients(prior, monkeypatch):
    torch.manual_seed(0)
    vla = VLAWithPriorForAction.from_prior(prior, "tiny", distill_weight=0.7).train()
    batch = _batch(vla)
    assert vla.teacher_is_history_encoder()
    reused, g_reused, teacher_calls = _step(vla, batch, True, monkeypatch)
    assert teacher_calls == 0  # the teacher did not run: its posterior came from the history token's encoder
    ran, g_ran, teacher_calls = _step(vla, batch, False, monkeypatch)
    assert teacher_calls == 1
    assert reused.kd_loss > 0
    for k in ("loss", "bc_loss", "kd_loss", "prior_mean", "prior_logvar", "latent_mean"):
        assert torch.equal(getattr(reused, k), getattr(ran, k)), k
    assert g_reused.keys() == g_ran.keys()
    assert all(torch.equal(g_reused[k], g_ran[k]) for k in g_ran)
    assert not reused.prior_mean.requires_grad


def test_the_reuse_switches_off_whenever_the_two_encoders_may_differ(prior, monkeypatch):
    torch.manual_seed(0)
    vla = VLAWithPriorForAction.from_prior(prior, "tiny", distill_weight=0.7).train()
    batch = _batch(vla)
    assert vla.teacher_is_history_encoder()
    with torch.no_grad():
        vla.teacher.to_latent.bias.add_(0.5)  # in place: caught by the version counter
    assert not vla.teacher_is_history_encoder()
    out, _, teacher_calls = _step(vla, batch, True, monkeypatch)
    assert teacher_calls == 1
    with torch.no_grad():
        vla.teacher.to_latent.bias.sub_(0.5)
    assert vla.teacher_is_history_encoder()  # equal again, weight for weight

    vla.history_encoder.load_state_dict({k: v + 1e-3 for k, v in vla.history_encoder.state_dict().items()})
    assert not vla.teacher_is_history_encoder()
    # A VLA built from a config alone has two independently initialized encoders.
    assert not VLAWithPriorForAction(vla.config).teacher_is_history_encoder()
    # A trainable history encoder is not the frozen teacher.
    assert not VLAWithPriorForAction.from_prior(prior, "tiny", freeze_history_encoder=False).teacher_is_history_encoder()
    assert not VLAWithPriorForAction.from_prior(prior, "tiny", history_token=False).teacher_is_history_encoder()


def test_the_reuse_survives_save_and_load(prior, tmp_path):
    torch.manual_seed(0)
    vla = VLAWithPriorForAction.from_prior(prior, "tiny")
    vla.save_pretrained(tmp_path / "vla")
    loaded = VLAWithPriorForAction.from_pretrained(tmp_path / "vla")
    assert loaded.teacher_is_history_encoder()
    assert set(loaded.state_dict()) == set(vla.state_dict())  # both encoders stay in the checkpoint


def test_predict_action_returns_an_ordinary_tensor(prior):
    torch.manual_seed(0)
    vla = VLAWithPriorForAction.from_prior(prior, "tiny").eval()
    batch = {k: v for k, v in _batch(vla).items() if k not in ("actions", "timesteps")}
    out = vla.predict_action(**batch, num_inference_steps=3)
    assert not out.is_inference() and out.shape == (3, 8, 32)
    out.mul_(2.0)


# ------------------------------------------------------------------------------------------ history encoder
def _reference_encoder(enc, history, history_mask, dim_mask, state=None):
    """The encoder as first written: every layer over every position, then the summary token's output."""
    b, k, _ = history.shape
    dm = dim_mask.to(history.dtype)[:, None, :]
    feats = torch.cat([history * dm * history_mask.to(history.dtype)[..., None], dm.expand(b, k, -1)], dim=-1)
    h = enc.action_in(feats)
    h = h + enc.position[:, -k:] if k > 0 else h
    summary = enc.summary_token.expand(b, -1, -1)
    if enc.state_in is not None and state is not None:
        summary = summary + enc.state_in(state)[:, None, :]
    h = torch.cat([summary, h], dim=1)
    pad = torch.cat([torch.zeros(b, 1, dtype=torch.bool), ~history_mask], dim=1)
    stats = enc.to_latent(enc.norm(enc.layers(h, src_key_padding_mask=pad)[:, 0]))
    mean, logvar = stats.chunk(2, dim=-1)
    return mean, logvar.clamp(enc.config.logvar_min, enc.config.logvar_max)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_the_encoder_computes_only_the_summary_token_in_its_last_layer_and_gets_the_same_posterior(preset):
    torch.manual_seed(0)
    enc = ap.modeling_actprior.ActionHistoryEncoder(ap.ActionPriorConfig.from_preset(preset, max_state_dim=8))
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    history, state = torch.randn(3, 12, 32), torch.randn(3, 8)
    history_mask = torch.ones(3, 12, dtype=torch.bool)
    history_mask[1, :7] = False  # an episode start
    history_mask[2] = False  # no past at all
    dim_mask = _masks()
    enc.eval()
    with torch.no_grad():
        for got, want in zip(enc(history, history_mask, dim_mask, state),
                             _reference_encoder(enc, history, history_mask, dim_mask, state)):
            torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
        for got, want in zip(enc(history[:, :0], history_mask[:, :0], dim_mask),
                             _reference_encoder(enc, history[:, :0], history_mask[:, :0], dim_mask)):
            torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    enc.train()  # Stage 1 trains it: the same gradients
    grads = []
    for fn in (enc, lambda *a: _reference_encoder(enc, *a)):
        enc.zero_grad(set_to_none=True)
        mean, logvar = fn(history, history_mask, dim_mask, state)
        (mean.square().sum() + logvar.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4, msg=n)
