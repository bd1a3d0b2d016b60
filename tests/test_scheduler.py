import threading

import pytest
import torch

from modeling_actprior import FlowMatchingActionScheduler


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_straight_flow_is_integrated_exactly(solver, steps):
    """For the optimal straight-path field v = noise - data the sampler lands on the data exactly."""
    g = torch.Generator().manual_seed(0)
    data, noise = torch.randn(4, 8, 5, generator=g), torch.randn(4, 8, 5, generator=g)
    sched = FlowMatchingActionScheduler(solver=solver).for_run(steps)
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(noise - data, t, x).prev_sample
    torch.testing.assert_close(x, data, atol=1e-5, rtol=0)


def test_time_runs_from_noise_at_one_to_data_at_zero_on_a_uniform_grid():
    sched = FlowMatchingActionScheduler()
    assert len(sched.timesteps) == 10
    assert sched.sigmas[0] == 1.0 and sched.sigmas[-1] == 0.0
    torch.testing.assert_close(sched.sigmas[:-1] - sched.sigmas[1:], torch.full((10,), 0.1))
    # Uniform, unlike diffusers' FlowMatchEulerDiscreteScheduler default shifted grid.
    assert sched.timesteps[0] == 1.0


def test_heun_is_second_order_on_a_curved_field():
    """dx/dt = x from t=1 to 0: exact x(0) = x(1) * e^-1. Heun's error shrinks ~4x per halving, Euler's ~2x."""
    import math

    def solve(solver, n):
        s = FlowMatchingActionScheduler(solver=solver).for_run(n)
        x = torch.ones(1, 1, 1, dtype=torch.float64)
        for t in s.timesteps:
            x = s.step(x, t, x).prev_sample.double()
        return abs(x.item() - math.exp(-1))

    assert solve("euler", 10) / solve("euler", 20) < 2.5
    assert solve("heun", 10) / solve("heun", 20) > 3.5


def test_state_stays_float32_whatever_the_model_dtype():
    sched = FlowMatchingActionScheduler().for_run(4)
    x = torch.randn(2, 3, 4)
    for t in sched.timesteps:
        out = sched.step(torch.full((2, 3, 4), 0.1, dtype=torch.bfloat16), t, x).prev_sample
        assert out.dtype == torch.float32
        x = out
    # 0.1 in bf16 is 0.10009765625; a bf16 state would also round x itself each step.
    assert x.dtype == torch.float32


def test_scheduler_round_trips_through_save_pretrained(tmp_path):
    sched = FlowMatchingActionScheduler(num_inference_steps=7, solver="heun")
    sched.save_pretrained(tmp_path)
    loaded = FlowMatchingActionScheduler.from_pretrained(tmp_path)
    assert loaded.config.solver == "heun" and loaded.config.num_inference_steps == 7
    torch.testing.assert_close(loaded.timesteps, sched.timesteps)


def test_runs_from_several_threads_do_not_share_step_state():
    shared = FlowMatchingActionScheduler()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(1, 4, 3, generator=g) for _ in range(8)]
    noise = [torch.randn(1, 4, 3, generator=g) for _ in range(8)]
    results = [None] * 8
    barrier = threading.Barrier(8)

    def worker(i):
        run = shared.for_run(5 + i)  # different step counts per thread
        x = noise[i].clone()
        barrier.wait()
        for t in run.timesteps:
            x = run.step(noise[i] - data[i], t, x).prev_sample
        results[i] = x

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for i in range(8):
        torch.testing.assert_close(results[i], data[i], atol=1e-5, rtol=0)
    assert len(shared.timesteps) == 10  # the shared instance was never touched


def test_bad_scheduler_settings_are_refused_with_the_valid_choices():
    with pytest.raises(ValueError, match="euler"):
        FlowMatchingActionScheduler(solver="rk45")
    with pytest.raises(ValueError, match="positive"):
        FlowMatchingActionScheduler().set_timesteps(0)
    sched = FlowMatchingActionScheduler().for_run(1)
    sched.step(torch.zeros(1, 1, 1), 1.0, torch.zeros(1, 1, 1))
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sched.step(torch.zeros(1, 1, 1), 0.0, torch.zeros(1, 1, 1))
