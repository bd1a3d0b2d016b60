"""Real-time control: few-step generation (shortcut models) and real-time chunking (RTC)."""

import shutil

import numpy as np
import pytest
import torch
from transformers import pipeline

import modeling_actprior as ap
from modeling_actprior.modeling_actprior import (
    ChunkGuidance,
    FlowMatchingActionDecoder,
    flow_matching_loss,
    integrate_flow,
    rtc_weights,
    shortcut_consistency_loss,
)
from modeling_actprior.rollout import run_episode
from modeling_actprior.scheduling_flow_matching import FlowMatchingActionScheduler

CHUNK = 8


def _vla(shortcut_max_steps=0, num_inference_steps=10):
    torch.manual_seed(0)
    prior = ap.ActionPriorModel(ap.ActionPriorConfig.from_preset(
        "tiny", chunk_size=CHUNK, history_length=4, shortcut_max_steps=shortcut_max_steps,
        num_inference_steps=num_inference_steps))
    norm = ap.ActionNormalizer(prior.config.max_action_dim)
    rng = np.random.default_rng(0)
    norm.add_embodiment(ap.get_embodiment("sawyer"), rng.normal(size=(200, 4)) * [0.5, 0.5, 0.3, 1.0])
    norm.add_embodiment(ap.get_embodiment("kuka_iiwa"), rng.uniform(-2, 2, size=(200, 8)) + 3.0)
    prior.normalizer = norm
    vla = ap.VLAWithPriorForAction.from_prior(prior, "tiny").eval()
    processor = ap.ActionPriorProcessor.from_config(vla.config, vla.normalizer, instructions=["reach the goal"])
    return vla, processor


@pytest.fixture(scope="module")
def robot():
    vla, processor = _vla()
    return pipeline("robot-action", model=vla, processor=processor, device="cpu")


@pytest.fixture(scope="module")
def shortcut_robot():
    vla, processor = _vla(shortcut_max_steps=8, num_inference_steps=2)
    return pipeline("robot-action", model=vla, processor=processor, device="cpu")


def _image(seed=0):
    return np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)


def _call(robot, seed=0, **kw):
    return robot(_image(seed), instruction="reach the goal", history=np.zeros((2, 4), np.float32), embodiment="sawyer",
                 seed=seed, **kw)


# ------------------------------------------------------------------------------------------ few-step generation
def test_without_shortcut_training_the_decoder_and_sampler_are_what_they_were():
    config = ap.ActionPriorConfig.from_preset("tiny")
    prior = ap.ActionPriorModel(config)
    assert config.shortcut_max_steps == 0 and prior.scheduler.config.solver == "euler"
    assert not prior.decoder.reads_step_size and not any("step_mlp" in k for k in prior.state_dict())
    with pytest.raises(ValueError, match="not trained as a shortcut model"):
        prior.decoder.time_condition(torch.tensor([0.5]), step_size=torch.tensor([0.5]))
    # A zero step size is the instantaneous velocity: accepted, and the time conditioning is unchanged.
    t = torch.tensor([0.3, 0.9])
    assert torch.equal(prior.decoder.time_condition(t), prior.decoder.time_condition(t, step_size=torch.zeros(2)))


def test_shortcut_solver_on_a_plain_decoder_is_refused_with_the_way_out():
    prior = ap.ActionPriorModel(ap.ActionPriorConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match="shortcut_max_steps 16"):
        prior.sample_actions(torch.zeros(1, prior.config.latent_dim),
                             scheduler=FlowMatchingActionScheduler(solver="shortcut"))


@pytest.mark.parametrize("bad", [1, 3, 12, -2])
def test_shortcut_max_steps_must_be_a_power_of_two(bad):
    with pytest.raises(ValueError, match="power of two"):
        ap.ActionPriorConfig.from_preset("tiny", shortcut_max_steps=bad)


def test_shortcut_scheduler_and_step_weights_round_trip_through_save_pretrained(tmp_path):
    torch.manual_seed(0)
    prior = ap.ActionPriorModel(ap.ActionPriorConfig.from_preset("tiny", shortcut_max_steps=8, num_inference_steps=2))
    assert prior.scheduler.config.solver == "shortcut" and prior.scheduler.config.num_inference_steps == 2
    assert prior.scheduler.model_step_sizes() == [0.5, 0.5]
    prior.save_pretrained(tmp_path / "p")
    loaded = ap.ActionPriorModel.from_pretrained(tmp_path / "p")
    assert loaded.scheduler.config.solver == "shortcut" and loaded.scheduler.num_inference_steps == 2
    assert loaded.config.shortcut_max_steps == 8
    for k, v in prior.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    z = torch.randn(3, prior.config.latent_dim)
    for n in (1, 2, 4):
        a = prior.sample_actions(z, num_inference_steps=n, generator=torch.Generator().manual_seed(0))
        b = loaded.sample_actions(z, num_inference_steps=n, generator=torch.Generator().manual_seed(0))
        assert torch.equal(a, b)


def test_vla_inherits_the_shortcut_sampler_and_trains_its_consistency_loss():
    vla, processor = _vla(shortcut_max_steps=8, num_inference_steps=2)
    assert vla.scheduler.config.solver == "shortcut" and vla.action_head.reads_step_size
    vla.train()
    b, pc = 4, vla.config.prior_config
    inputs = processor(images=[_image(i) for i in range(b)], text=["reach the goal"] * b)
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    out = vla(input_ids=ids, pixel_values=pixels, attention_mask=inputs.get("attention_mask"),
              history=torch.randn(b, 4, pc.max_action_dim), actions=torch.randn(b, CHUNK, pc.max_action_dim),
              generator=torch.Generator().manual_seed(0))
    assert out.shortcut_loss is not None and out.shortcut_loss > 0
    assert torch.allclose(out.loss, out.bc_loss + out.kd_weight * out.kd_loss + out.shortcut_loss)
    out.loss.backward()
    assert vla.action_head.step_mlp[-1].weight.grad.abs().sum() > 0
    # The consistency term shapes the action head only: the latent is detached from it.
    plain, _ = _vla()
    assert plain(input_ids=ids, pixel_values=pixels, history=torch.randn(b, 4, pc.max_action_dim),
                 actions=torch.randn(b, CHUNK, pc.max_action_dim)).shortcut_loss is None


def test_shortcut_training_makes_one_step_samples_land_on_the_modes():
    """Two modes (+1 and -1 for the whole chunk) behind one latent: one Euler step of the instantaneous velocity lands
    between them (its velocity at pure noise points at the mean); the shortcut's one step lands on a mode."""

    def train(shortcut_max_steps):
        torch.manual_seed(0)
        cfg = ap.ActionPriorConfig.from_preset("tiny", chunk_size=4, max_action_dim=2, latent_dim=4,
                                               shortcut_max_steps=shortcut_max_steps)
        decoder = FlowMatchingActionDecoder(cfg)
        opt = torch.optim.Adam(decoder.parameters(), 3e-3)
        scheduler, g = FlowMatchingActionScheduler(), torch.Generator().manual_seed(0)
        b = 64
        z, am, dm = torch.zeros(b, 4), torch.ones(b, 4, dtype=torch.bool), torch.ones(b, 2, dtype=torch.bool)
        for _ in range(300):
            actions = (torch.randint(0, 2, (b, 1, 1), generator=g) * 2 - 1.0).expand(b, 4, 2)
            loss = flow_matching_loss(decoder, scheduler, z, actions, am, dm, torch.randn(b, 4, 2, generator=g),
                                      torch.rand(b, generator=g))[0]
            if shortcut_max_steps:
                loss = loss + shortcut_consistency_loss(decoder, z, actions, am, dm, g)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return decoder.eval()

    def off_mode(decoder, solver, steps):
        x = integrate_flow(decoder, FlowMatchingActionScheduler(solver=solver), torch.zeros(256, 4),
                           torch.ones(256, 2, dtype=torch.bool), 4, steps, torch.Generator().manual_seed(1))
        return float(((x.abs() - 1) ** 2).mean())

    shortcut = train(8)
    one_step = off_mode(shortcut, "shortcut", 1)
    assert one_step < 0.4 * off_mode(shortcut, "euler", 1)
    assert one_step < 0.4 * off_mode(train(0), "euler", 1)
    assert off_mode(shortcut, "shortcut", 2) < 0.4 * off_mode(shortcut, "euler", 2)


def test_pipeline_picks_the_step_count_per_call_and_the_solver_from_the_scheduler_config(shortcut_robot):
    two = _call(shortcut_robot)["actions"]
    assert np.array_equal(two, _call(shortcut_robot, num_inference_steps=2)["actions"])
    assert not np.allclose(two, _call(shortcut_robot, num_inference_steps=1)["actions"])
    model = shortcut_robot.model
    saved = model.scheduler
    try:
        model.scheduler = FlowMatchingActionScheduler.from_config(saved.config, solver="euler")
        euler = _call(shortcut_robot, num_inference_steps=2)["actions"]
    finally:
        model.scheduler = saved
    assert not np.allclose(two, euler)  # the same steps, with the instantaneous velocity instead of the shortcut


# ------------------------------------------------------------------------------------------ real-time chunking
def test_rtc_weights_follow_the_papers_schedule():
    w = rtc_weights(16, 4, 10)
    assert torch.equal(w[:4], torch.ones(4)) and torch.equal(w[10:], torch.zeros(6))
    assert bool((w[4:10] > 0).all()) and bool((w[3:11].diff() < 0).all())
    assert torch.equal(rtc_weights(8, 0, 0), torch.zeros(8))
    with pytest.raises(ValueError, match="inference_delay <= execution_horizon"):
        rtc_weights(8, 5, 4)


@pytest.mark.parametrize("fixture", ["robot", "shortcut_robot"])
def test_zero_guidance_is_the_unguided_sample_and_the_prefix_is_committed_exactly(fixture, request):
    robot = request.getfixturevalue(fixture)
    previous = _call(robot, seed=5)["actions"][3:]  # what is left after executing 3 actions
    free = _call(robot, seed=1)["actions"]
    off = _call(robot, seed=1, previous_chunk=previous, inference_delay=2, max_guidance_weight=0.0)["actions"]
    assert np.array_equal(off[:2], previous[:2])
    np.testing.assert_allclose(off[2:], free[2:], atol=1e-5)
    guided = _call(robot, seed=1, previous_chunk=previous, inference_delay=2)["actions"]
    assert np.array_equal(guided[:2], previous[:2])
    # The overlap moves toward the previous chunk; past the execution horizon nothing pulls.
    overlap = slice(2, len(previous))
    assert np.mean((guided[overlap] - previous[overlap]) ** 2) < 0.7 * np.mean((free[overlap] - previous[overlap]) ** 2)


def test_rtc_works_batched_and_per_sample(robot):
    prev = [_call(robot, seed=s)["actions"][2:] for s in (5, 6)]
    images = [_image(0), _image(1)]
    batch = robot(images, instruction="reach the goal", history=np.zeros((2, 4), np.float32), embodiment="sawyer",
                  seed=[1, 2], previous_chunk=prev, inference_delay=3)
    for i, out in enumerate(batch):
        assert np.array_equal(out["actions"][:3], prev[i][:3])
        single = robot(images[i], instruction="reach the goal", history=np.zeros((2, 4), np.float32),
                       embodiment="sawyer", seed=[1, 2][i], previous_chunk=prev[i], inference_delay=3)
        np.testing.assert_allclose(out["actions"], single["actions"], atol=1e-5)


def test_rtc_accepts_the_previous_output_and_checks_its_embodiment(robot):
    out = _call(robot, seed=3)
    left = {**out, "actions": out["actions"][4:]}
    chunk = _call(robot, previous_chunk=left, inference_delay=1)["actions"]
    assert np.array_equal(chunk[:1], out["actions"][4:5])
    with pytest.raises(ValueError, match="made for embodiment 'kuka_iiwa'"):
        _call(robot, previous_chunk={**left, "embodiment": "kuka_iiwa"}, inference_delay=1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(previous_chunk=np.zeros((6, 4)), inference_delay=CHUNK), "not shorter than the chunk"),
    (dict(previous_chunk=np.zeros((3, 4)), inference_delay=4), "longer than previous_chunk"),
    (dict(previous_chunk=np.zeros((6, 8)), inference_delay=1), r"must be \(steps, 4\)"),
    (dict(previous_chunk=np.zeros((CHUNK + 1, 4)), inference_delay=1), "1 to 8 steps"),
    (dict(previous_chunk=np.zeros((6, 4)), inference_delay=-1), "whole number"),
    (dict(previous_chunk=np.zeros((6, 4)), inference_delay=2, execution_horizon=7), "execution_horizon"),
    (dict(previous_chunk=np.full((6, 4), np.nan), inference_delay=1), "NaN"),
    (dict(previous_chunk=np.zeros((6, 4)), max_guidance_weight=-1.0), "max_guidance_weight"),
    (dict(inference_delay=2), "need previous_chunk"),
])
def test_bad_rtc_arguments_are_refused(robot, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _call(robot, **kwargs)


def test_chunk_guidance_checks_its_shape():
    prior = ap.ActionPriorModel(ap.ActionPriorConfig.from_preset("tiny", chunk_size=CHUNK))
    bad = ChunkGuidance(torch.zeros(1, CHUNK - 1, prior.config.max_action_dim), 1, 3)
    with pytest.raises(ValueError, match="ChunkGuidance target must be"):
        integrate_flow(prior.decoder, prior.scheduler, torch.zeros(1, prior.config.latent_dim),
                       torch.ones(1, prior.config.max_action_dim, dtype=torch.bool), CHUNK, guidance=bad)


# ------------------------------------------------------------------------------------------ closed loop with a delay
class _Recorder:
    """A pipeline wrapper that keeps every chunk it returned."""

    def __init__(self, robot):
        self.robot, self.chunks = robot, []
        self.processor, self.normalizer, self.model = robot.processor, robot.normalizer, robot.model

    def __call__(self, *args, **kwargs):
        out = self.robot(*args, **kwargs)
        self.chunks.append(out["actions"].copy())
        return out


class _Task:
    task, instruction, max_steps = "reach", "reach the goal", 60

    def reset(self, seed):
        self.executed = []

    def image(self):
        return np.zeros((32, 32, 3), np.uint8)

    def step(self, action):
        self.executed.append(np.asarray(action))
        return False, False


@pytest.mark.parametrize("delay, rtc", [(0, False), (2, False), (2, True), (4, True), (4, False)])
def test_a_delayed_robot_keeps_executing_the_previous_chunk(robot, delay, rtc):
    rec, task, s = _Recorder(robot), _Task(), 4
    ok, steps, plans, _, smooth = run_episode(rec, task, 0, s, 20, "sawyer", inference_delay=delay, rtc=rtc)
    c = rec.chunks
    expect = list(c[0][:s])
    for k in range(1, plans):
        expect += list(c[k - 1][s:s + delay]) + list(c[k][delay:s])
    assert steps == 20 and plans == 5
    np.testing.assert_array_equal(np.stack(task.executed), np.stack(expect)[:20])
    assert len(smooth["boundary"]) + len(smooth["within"]) == 19
    if rtc:  # the committed actions are the very ones the robot executed during the delay
        for k in range(1, plans):
            assert np.array_equal(c[k][:delay], c[k - 1][s:s + delay])


def test_a_delay_the_chunk_cannot_cover_is_refused(robot):
    with pytest.raises(ValueError, match="at most execute_steps"):
        run_episode(robot, _Task(), 0, 4, 20, "sawyer", inference_delay=5)
    with pytest.raises(ValueError, match="at most the chunk"):
        run_episode(robot, _Task(), 0, 6, 20, "sawyer", inference_delay=3)


# ------------------------------------------------------------------------------------------ compiled flow loop
_NO_COMPILER = not any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.skipif(_NO_COMPILER, reason="torch.compile on a CPU needs a C++ compiler")
def test_the_compiled_flow_samples_what_the_eager_loop_samples_and_compiles_ahead_of_the_first_chunk():
    """``compile_flow`` on a pipeline's model (the shortcut solver at 2 steps, batch 1): the chunks match the eager
    loop's to float32 rounding, the first chunk reuses the graph compiled ahead (no compiling while the robot waits),
    and ``compile_flow(False)`` gives the eager loop's chunk bit for bit."""
    import torch._dynamo

    vla, processor = _vla(shortcut_max_steps=8, num_inference_steps=2)
    robot = pipeline("robot-action", model=vla, processor=processor, device="cpu")
    eager = [_call(robot, seed=s)["actions"] for s in range(3)]
    eager4 = _call(robot, seed=0, num_inference_steps=4)["actions"]
    previous = eager[2][3:]
    guided = _call(robot, seed=1, previous_chunk=previous, inference_delay=2)["actions"]
    assert robot.model.compile_flow(num_inference_steps=(2, 4)) is robot.model
    assert robot.model.action_head._compiled_flow is not None
    with torch._dynamo.config.patch(error_on_recompile=True):  # both step counts were compiled ahead
        compiled = [_call(robot, seed=s)["actions"] for s in range(3)]
        np.testing.assert_allclose(_call(robot, seed=0, num_inference_steps=4)["actions"], eager4, atol=1e-5)
    for a, b in zip(compiled, eager):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # Real-time chunking guides through the decoder's gradient: that loop stays eager, and exact.
    assert np.array_equal(_call(robot, seed=1, previous_chunk=previous, inference_delay=2)["actions"], guided)
    robot.model.compile_flow(False)
    assert np.array_equal(_call(robot, seed=0)["actions"], eager[0])


def test_compile_flow_refuses_a_solver_it_does_not_compile():
    vla, _ = _vla()
    vla.scheduler = FlowMatchingActionScheduler(solver="heun")
    with pytest.raises(ValueError, match="Euler and shortcut solvers; this scheduler uses 'heun'"):
        vla.compile_flow()
    assert vla.action_head._compiled_flow is None


@pytest.mark.skipif(_NO_COMPILER, reason="torch.compile on a CPU needs a C++ compiler")
def test_one_process_compiles_the_flow_of_more_models_than_torch_compiles_cache_limit():
    """torch.compile keeps at most 8 graphs per function; each decoder compiles its own copy of the loop, so a
    benchmark or a fleet of policies in one process is not cut off at the ninth model."""
    for i in range(10):
        prior = ap.ActionPriorModel(ap.ActionPriorConfig.from_preset("tiny", chunk_size=4 + i % 3,
                                                                     num_inference_steps=2)).eval()
        prior.compile_flow()
        z = torch.randn(1, prior.config.latent_dim, generator=torch.Generator().manual_seed(i))
        compiled = prior.sample_actions(z, num_inference_steps=2, generator=torch.Generator().manual_seed(i))
        prior.compile_flow(False)
        eager = prior.sample_actions(z, num_inference_steps=2, generator=torch.Generator().manual_seed(i))
        np.testing.assert_allclose(compiled, eager, atol=1e-5)


def test_a_failing_compiled_loop_falls_back_to_the_eager_one_and_copies_sample_eagerly(caplog):
    """A compiled loop that fails (torch.compile's graph limit reached, a compiler gone) is dropped with a warning and
    the chunk comes from the eager loop; copies and pickles of a model never carry the compiled loop (it belongs to
    the decoder it was compiled for)."""
    import copy
    import pickle

    vla, _ = _vla(shortcut_max_steps=8, num_inference_steps=2)
    z = torch.randn(2, vla.config.prior_config.latent_dim, generator=torch.Generator().manual_seed(0))
    eager = vla.sample_actions(z, num_inference_steps=2, generator=torch.Generator().manual_seed(1))

    def broken(*args):
        raise RuntimeError("FailOnRecompileLimitHit: Hard failure due to fullgraph=True")

    vla.action_head._compiled_flow = broken
    copied = copy.deepcopy(vla)
    assert copied.action_head._compiled_flow is None
    assert pickle.loads(pickle.dumps(vla.action_head))._compiled_flow is None
    with caplog.at_level("WARNING"):
        again = vla.sample_actions(z, num_inference_steps=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, eager) and vla.action_head._compiled_flow is None
    assert "samples eagerly from now on" in caplog.text
