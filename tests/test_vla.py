import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoProcessor

import modeling_actprior as ap
from modeling_actprior import ActionPriorProcessor, VLAWithPriorConfig, VLAWithPriorForAction

INSTRUCTIONS = ["pick up the red cube", "open the drawer", "push the button"]


def _vla(prior, seed=0, **overrides) -> VLAWithPriorForAction:
    torch.manual_seed(seed)
    return VLAWithPriorForAction.from_prior(prior, "tiny", **overrides)


def _inputs(vla, b=2, seed=0, history_steps=(3, 0)):
    """Processor outputs for ``b`` random images of sawyer, plus a future chunk."""
    rng = np.random.default_rng(seed)
    proc = ActionPriorProcessor.from_config(vla.config, vla.normalizer, instructions=INSTRUCTIONS)
    images = [rng.integers(0, 255, (40, 40, 3), dtype=np.uint8) for _ in range(b)]
    hist = [rng.normal(size=(history_steps[i % len(history_steps)], 4)) for i in range(b)]
    inputs = dict(proc(images=images, text=INSTRUCTIONS[:b], history=hist, embodiment="sawyer"))
    g = torch.Generator().manual_seed(seed)
    actions = torch.randn(b, 8, 32, generator=g) * inputs["dim_mask"][:, None]
    return proc, inputs, actions


def _fixed(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(noise=torch.randn(b, 8, 32, generator=g), timesteps=torch.rand(b, generator=g))


def _equal_states(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------ construction
def test_from_prior_reuses_the_prior_bit_for_bit(prior):
    vla = _vla(prior)
    assert _equal_states(vla.action_head, prior.decoder)
    assert _equal_states(vla.teacher, prior.encoder)
    assert _equal_states(vla.history_encoder, prior.encoder)
    assert vla.normalizer.embodiment_names == ["kuka_iiwa", "sawyer"]
    assert vla.scheduler.config == prior.scheduler.config
    assert vla.config.prior_config.chunk_size == 8 and vla.config.prior_config.history_length == 4


def test_teacher_gets_no_gradient_and_kd_is_exactly_zero_once_its_schedule_ends(prior):
    vla = _vla(prior, distill_weight=0.5, distill_hold_steps=2, distill_decay_steps=3).train()
    _, inputs, actions = _inputs(vla)
    assert not vla.teacher.training  # train() keeps the teacher in eval mode
    out = vla(**inputs, actions=actions, step=0, **_fixed())
    out.loss.backward()
    assert out.kd_loss > 0 and out.kd_weight == 0.5
    torch.testing.assert_close(out.loss, out.bc_loss + 0.5 * out.kd_loss)
    assert all(p.grad is None and not p.requires_grad for p in vla.teacher.parameters())
    assert vla.latent_readout.weight.grad.abs().sum() > 0

    calls = []
    vla.teacher.register_forward_hook(lambda *a: calls.append(1))
    for step in (5, 6, 1000):  # hold 2 + decay 3: lambda is 0 from step 5 on
        out = vla(**inputs, actions=actions, step=step, **_fixed())
        assert out.kd_loss.item() == 0.0 and out.kd_weight.item() == 0.0 and out.prior_mean is None
        assert torch.equal(out.loss, out.bc_loss)
    assert calls == []  # the teacher never ran
    vla.training_step.fill_(1)  # without `step`, the buffer the training script sets is used
    assert vla(**inputs, actions=actions, **_fixed()).kd_weight.item() == 0.5


def test_distillation_weight_holds_then_decays_to_exactly_zero():
    cfg = VLAWithPriorConfig.from_preset("tiny", distill_weight=2.0, distill_hold_steps=10, distill_decay_steps=20)
    lam = [cfg.distill_lambda(s) for s in range(40)]
    assert lam[:10] == [2.0] * 10
    assert lam[20] == pytest.approx(1.0)  # cosine half-way
    assert all(a >= b for a, b in zip(lam[10:30], lam[11:31]))
    assert lam[30:] == [0.0] * 10
    linear = VLAWithPriorConfig.from_preset("tiny", distill_hold_steps=0, distill_decay_steps=4, distill_decay="linear")
    assert [linear.distill_lambda(s) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_lora_parameters_and_the_action_head_receive_gradients(prior):
    vla = _vla(prior, lora_r=4).train()
    _, inputs, actions = _inputs(vla)
    vla(**inputs, actions=actions, step=0, **_fixed()).loss.backward()
    named = dict(vla.named_parameters())
    lora = {n: p for n, p in named.items() if "lora_" in n}
    assert lora and all(p.requires_grad and p.grad is not None for p in lora.values())
    assert all(p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)  # lora_A's grad is 0 while B = 0
    assert not any("vision_tower" in n for n in lora)  # vision frozen by default
    assert all(not p.requires_grad for n, p in named.items() if "vision_tower" in n)
    assert all(not p.requires_grad for n, p in named.items() if "language_model" in n and "lora_" not in n)
    assert all(p.grad.abs().sum() > 0 for n, p in vla.action_head.named_parameters() if "modulation" not in n)
    vision_lora = _vla(prior, lora_r=4, vision_mode="lora")
    assert any("vision_tower" in n and "lora_" in n for n, _ in vision_lora.named_parameters())


def test_lora_adapters_save_load_and_merge_keep_the_actions(prior, tmp_path):
    vla = _vla(prior, lora_r=4).eval()
    _, inputs, _ = _inputs(vla)
    with torch.no_grad():
        for n, p in vla.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    ref = vla.predict_action(**inputs, generator=torch.Generator().manual_seed(0))
    vla.save_lora_adapters(tmp_path / "adapters")
    assert (tmp_path / "adapters" / "adapter_model.safetensors").exists()
    with torch.no_grad():
        for n, p in vla.named_parameters():
            if "lora_B" in n:
                p.zero_()
    assert not torch.allclose(vla.predict_action(**inputs, generator=torch.Generator().manual_seed(0)), ref)
    vla.load_lora_adapters(tmp_path / "adapters")
    torch.testing.assert_close(vla.predict_action(**inputs, generator=torch.Generator().manual_seed(0)), ref)
    vla.merge_lora()
    assert vla.config.lora_r == 0 and not any("lora_" in n for n, _ in vla.named_parameters())
    torch.testing.assert_close(vla.predict_action(**inputs, generator=torch.Generator().manual_seed(0)), ref,
                               rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ switches
def test_history_token_adds_exactly_one_position_whatever_the_history_length(prior):
    on, off = _vla(prior), _vla(prior, history_token=False)
    seen = []
    for m in (on, off):
        m.base_vlm.language_model.register_forward_pre_hook(
            lambda mod, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    _, inputs, _ = _inputs(on)
    prompt = inputs["input_ids"].shape[1]
    on.encode(**inputs)
    off.encode(**{k: v for k, v in inputs.items() if k != "history"})
    assert seen == [prompt + 2, prompt + 1]  # + history token + latent query, or the query only
    short = dict(inputs, history=inputs["history"][:, -1:], history_mask=inputs["history_mask"][:, -1:])
    assert on.prefix_embeddings(**short)[0].shape[1] == prompt + 2


def test_each_baseline_switch_changes_only_what_it_names(prior):
    full = _vla(prior)
    _, inputs, actions = _inputs(full)
    full.train()
    ref = full(**inputs, actions=actions, step=0, **_fixed())
    # Same VLM weights everywhere: switches must not depend on random draws to be compared.
    vlm_state = full.vlm.state_dict()

    random_head = _vla(prior, use_prior_decoder=False)
    assert not _equal_states(random_head.action_head, prior.decoder)
    assert _equal_states(random_head.teacher, prior.encoder) and _equal_states(random_head.history_encoder, prior.encoder)
    assert random_head.config.distill_weight == full.config.distill_weight and random_head.config.history_token

    no_kd = _vla(prior, distill_weight=0.0)
    no_kd.vlm.load_state_dict(vlm_state)
    for name in ("latent_query", "latent_readout.weight", "latent_readout.bias", "history_projection.weight"):
        no_kd.get_parameter(name).data.copy_(full.get_parameter(name))
    out = no_kd.train()(**inputs, actions=actions, step=0, **_fixed())
    assert out.kd_loss.item() == 0.0 and out.kd_weight.item() == 0.0
    torch.testing.assert_close(out.bc_loss, ref.bc_loss)  # same latent, same head: only the KD term is gone
    assert _equal_states(no_kd.action_head, prior.decoder)

    no_hist = _vla(prior, history_token=False)
    assert not hasattr(no_hist, "history_encoder") and not hasattr(no_hist, "history_projection")
    assert _equal_states(no_hist.action_head, prior.decoder) and _equal_states(no_hist.teacher, prior.encoder)
    assert no_hist.train()(**inputs, actions=actions, step=0, **_fixed()).kd_loss > 0  # still distils


def test_named_baselines_set_the_documented_switches(prior):
    no_prior = _vla(prior, baseline="no_prior")
    assert (no_prior.config.use_prior_decoder, no_prior.config.distill_weight, no_prior.config.history_token) == (
        False, 0.0, False)
    assert not _equal_states(no_prior.action_head, prior.decoder)
    decoder_only = _vla(prior, baseline="decoder_only")
    assert _equal_states(decoder_only.action_head, prior.decoder) and decoder_only.config.distill_weight == 0.0
    assert _vla(prior, baseline="kd_only", distill_weight=0.3).config.distill_weight == 0.3
    with pytest.raises(ValueError, match="Unknown baseline 'nope'"):
        _vla(prior, baseline="nope")


# ------------------------------------------------------------------------------------------ inference
def test_predict_action_runs_the_vlm_once_and_only_the_head_per_flow_step(prior):
    vla = _vla(prior).eval()
    _, inputs, _ = _inputs(vla)
    vlm_calls, head_calls = [], []
    vla.vlm.register_forward_hook(lambda *a: vlm_calls.append(1))
    vla.action_head.register_forward_hook(lambda *a: head_calls.append(1))
    out = vla.predict_action(**inputs, generator=torch.Generator().manual_seed(0), num_inference_steps=6)
    assert out.shape == (2, 8, 32) and len(vlm_calls) == 1 and len(head_calls) == 6
    assert torch.all(out[:, :, 4:] == 0)  # sawyer has 4 real dimensions


def test_a_state_the_vla_cannot_read_is_refused(prior):
    """The prior reads no state: a state passed anyway is an error, not silently dropped; NaN in a state is refused
    like NaN in the history."""
    vla = _vla(prior).eval()
    _, inputs, actions = _inputs(vla)
    with pytest.raises(ValueError, match=r"reads no state \(max_state_dim=0\)"):
        vla.predict_action(**inputs, state=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"reads no state"):
        vla(**inputs, actions=actions, state=torch.zeros(2, 3))


def test_raw_observation_to_raw_actions_through_the_processor(prior):
    vla = _vla(prior).eval()
    proc, _, _ = _inputs(vla)
    image = np.zeros((24, 24, 3), np.uint8)
    raw = vla.predict_raw_actions(proc, image, "open the drawer", np.ones((2, 8)), "kuka_iiwa",
                                  generator=torch.Generator().manual_seed(0))
    assert raw.shape == (8, 8) and torch.isfinite(raw).all()


@pytest.mark.parametrize("family", ["llava", "paligemma"])
def test_both_vlm_families_train_forward_and_backward(prior, family):
    vla = _vla(prior, vlm_family=family).train()
    assert vla.config.vlm_config.model_type == family
    _, inputs, actions = _inputs(vla)
    out = vla(**inputs, actions=actions, step=0)
    assert torch.isfinite(out.loss) and out.bc_loss > 0 and out.kd_loss > 0
    out.loss.backward()
    for name in ("latent_query", "latent_readout.weight", "history_projection.weight"):
        assert vla.get_parameter(name).grad.abs().sum() > 0, name
    lm = [p for n, p in vla.named_parameters() if "language_model" in n and p.requires_grad]
    assert lm and all(p.grad is not None for p in lm)
    chunk = vla.eval().predict_action(**inputs, generator=torch.Generator().manual_seed(0))
    assert chunk.shape == (2, 8, 32) and torch.isfinite(chunk).all()


def test_openvla_7b_preset_builds_on_the_meta_device_with_about_seven_billion_parameters():
    config = VLAWithPriorConfig.from_preset("openvla-7b")
    with torch.device("meta"):
        vla = VLAWithPriorForAction(config)
    assert all(p.device.type == "meta" for p in vla.parameters())
    assert 6.8e9 < vla.num_parameters() < 7.5e9
    assert config.text_hidden_size == 4096 and config.vlm_config.vision_config.hidden_size == 1152
    assert config.num_image_tokens == 256  # 224 px / 14 px patches, SigLIP has no CLS token


# ------------------------------------------------------------------------------------------ hub
def test_save_load_and_remote_code_give_identical_actions(prior, tmp_path):
    vla = _vla(prior, lora_r=2).eval()
    _, inputs, _ = _inputs(vla)
    ckpt = tmp_path / "ckpt"
    vla.save_pretrained(ckpt)
    files = set(os.listdir(ckpt))
    assert {"model.safetensors", "config.json", "action_normalizer.json", "scheduler", "modeling_actprior_vla.py",
            "configuration_actprior_vla.py", "modeling_actprior.py"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    expected = vla.predict_action(**inputs, generator=torch.Generator().manual_seed(5))

    loaded = AutoModel.from_pretrained(ckpt).eval()
    assert type(loaded) is VLAWithPriorForAction and loaded.config.lora_r == 2
    assert loaded.normalizer.embodiment_names == vla.normalizer.embodiment_names
    assert torch.equal(loaded.predict_action(**inputs, generator=torch.Generator().manual_seed(5)), expected)

    torch.save({k: v for k, v in inputs.items()}, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["modeling_actprior"] = None  # any import of the installed package now fails
        import torch
        from transformers import AutoModel
        m = AutoModel.from_pretrained({str(ckpt)!r}, trust_remote_code=True).eval()
        assert "transformers_modules" in type(m).__module__, type(m).__module__
        assert m.normalizer is not None and m.scheduler is not None
        inputs = torch.load({str(tmp_path / 'inputs.pt')!r}, weights_only=True)
        out = m.predict_action(**inputs, generator=torch.Generator().manual_seed(5))
        torch.save(out, {str(tmp_path / 'out.pt')!r})
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "out.pt", weights_only=True), expected)


def test_loaded_weights_sit_in_aligned_storage_of_their_own(prior, tmp_path):
    # safetensors hands out tensors at 8-byte file offsets; kernels that vectorize differently on unaligned inputs
    # (AMD EPYC, AVX-512) made a reloaded model's chunk differ from the saved one's by ~1e-8.
    _vla(prior, lora_r=2).save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    unaligned = [n for n, t in [*loaded.named_parameters(), *loaded.named_buffers()] if t.data_ptr() % 64]
    assert not unaligned, unaligned[:5]
    prior.save_pretrained(tmp_path / "prior")
    reloaded_prior = AutoModel.from_pretrained(tmp_path / "prior")
    assert all(t.data_ptr() % 64 == 0 for t in [*reloaded_prior.parameters(), *reloaded_prior.buffers()])


def test_exported_vla_code_files_import_only_their_siblings(prior, tmp_path):
    import ast

    _vla(prior).save_pretrained(tmp_path)
    ActionPriorProcessor.from_config(_vla(prior).config, prior.normalizer, instructions=INSTRUCTIONS).save_pretrained(tmp_path)
    assert "processing_actprior.py" in os.listdir(tmp_path)
    for name in os.listdir(tmp_path):
        if name.endswith(".py"):
            for node in ast.walk(ast.parse((tmp_path / name).read_text())):
                if isinstance(node, ast.Import):
                    assert not any(a.name.split(".")[0] == "modeling_actprior" for a in node.names), name
                elif isinstance(node, ast.ImportFrom):
                    assert node.level == 1 or (node.module or "").split(".")[0] != "modeling_actprior", name
                    if node.level == 1:  # siblings only: never the package's data or training layers
                        assert (node.module or "").split(".")[0] not in ("data", "training"), name


def test_auto_processor_round_trip_restores_images_tokenizer_and_statistics(prior, tmp_path):
    vla = _vla(prior)
    proc, inputs, _ = _inputs(vla)
    proc.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is ActionPriorProcessor
    assert loaded.action_normalizer.to_dict() == proc.action_normalizer.to_dict()
    assert loaded.num_image_tokens == vla.config.num_image_tokens == 16
    assert loaded.image_token_id == vla.config.image_token_id
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 40, 3), dtype=np.uint8) for _ in range(2)]
    hist = [rng.normal(size=(3, 4)), rng.normal(size=(0, 4))]
    again = loaded(images=images, text=INSTRUCTIONS[:2], history=hist, embodiment="sawyer")
    assert set(again) == set(inputs)
    for k in inputs:
        assert torch.equal(again[k], inputs[k]), k


def test_processor_pads_left_and_right_aligns_history(prior):
    vla = _vla(prior)
    _, inputs, _ = _inputs(vla)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert torch.all(mask[:, -1] == 1) and (mask[1] == 0).any()  # the shorter instruction is padded on the left
    assert (ids == vla.config.image_token_id).sum(1).tolist() == [16, 16]
    assert inputs["history_mask"].tolist() == [[False, True, True, True], [False, False, False, False]]
    assert inputs["dim_mask"].sum(1).tolist() == [4, 4]


def test_processor_errors_name_what_came_and_what_is_known(prior):
    proc, _, _ = _inputs(_vla(prior))
    image = np.zeros((24, 24, 3), np.uint8)
    with pytest.raises(ap.UnknownEmbodimentError, match="kuka_iiwa, sawyer"):
        proc(images=image, text="go", history=[np.zeros((2, 4))], embodiment="unitree_h1")
    with pytest.raises(TypeError, match=r"PIL image or an \(H, W, 3\) uint8 array; got ndarray .*float64"):
        proc(images=np.zeros((24, 24, 3)), text="go")
    with pytest.raises(TypeError, match="Pick one camera"):
        proc(images={"front": image}, text="go")
    with pytest.raises(ValueError, match=r"\(steps, 4\) raw actions .*got shape \(2, 7\)"):
        proc(images=image, text="go", history=[np.zeros((2, 7))], embodiment="sawyer")
    with pytest.raises(ValueError, match="Pass the last 4 actions"):
        proc(images=image, text="go", history=[np.zeros((9, 4))], embodiment="sawyer")
    with pytest.raises(ValueError, match="2 images but 1 instructions"):
        proc(images=[image, image], text="go")


def test_model_errors_explain_the_fix(prior):
    vla = _vla(prior)
    _, inputs, actions = _inputs(vla)
    with pytest.raises(ValueError, match="got no history"):
        vla(**{k: v for k, v in inputs.items() if k != "history"}, actions=actions)
    with pytest.raises(ValueError, match="image placeholder tokens"):
        vla(**dict(inputs, input_ids=inputs["input_ids"][:, 3:], attention_mask=inputs["attention_mask"][:, 3:]))
    with pytest.raises(ValueError, match="chunk_size=8"):
        vla(**inputs, actions=actions[:, :5])
    with pytest.raises(ValueError, match="safetensors only"):
        vla.save_pretrained("/nonexistent", safe_serialization=False)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        vla.merge_lora()


def test_impossible_vla_config_values_are_refused():
    with pytest.raises(ValueError, match="Unknown VLAWithPriorConfig preset"):
        VLAWithPriorConfig.from_preset("huge")
    with pytest.raises(ValueError, match="Unknown vlm_family"):
        VLAWithPriorConfig.from_preset("tiny", vlm_family="qwen2_vl")
    with pytest.raises(ValueError, match="distill_decay must be one of"):
        VLAWithPriorConfig.from_preset("tiny", distill_decay="step")
    with pytest.raises(ValueError, match="distill_weight >= 0"):
        VLAWithPriorConfig.from_preset("tiny", distill_weight=-1.0)
    with pytest.raises(ValueError, match="version 99"):
        VLAWithPriorConfig.from_preset("tiny", actprior_vla_config_version=99)
