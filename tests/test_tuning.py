"""Persistent kernel tuning: cache keys, the on-disk cache, the shipped table (CPU only)."""

import inspect
import json

import pytest
import torch

tuning = pytest.importorskip("video_sparse_attn.kernels.tuning")

H100 = "NVIDIA H100 80GB HBM3"
BASE = dict(gpu=H100, kernel="fwd", dtype=torch.bfloat16, head_dim=128, q_block=384, k_block=384,
            variant="tma1.ws0.peel1.lazy1")
CFG = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}


def key(**change):
    return tuning.cache_key(**{**BASE, **change})


def test_cache_key_changes_with_what_tuning_depends_on():
    assert key() == key()
    for change in (dict(dtype=torch.float16), dict(head_dim=64), dict(q_block=128), dict(k_block=128),
                   dict(gpu="NVIDIA H200"), dict(kernel="bwd1"), dict(variant="tma0.ws0.peel1.lazy1")):
        assert key(**change) != key(), change
    assert tuning.KERNEL_VERSION in key()


def test_cache_key_has_no_sequence_length():
    params = set(inspect.signature(tuning.cache_key).parameters)
    assert params == {"gpu", "kernel", "dtype", "head_dim", "q_block", "k_block", "variant"}
    # the same family at two sequence lengths is one key: nothing shape-derived beyond D and blocks
    assert key(head_dim=128) == key()


def test_record_then_lookup_round_trip(tmp_path):
    path = tmp_path / "tuning.json"
    assert tuning.lookup(key(), 384, 384, cache_path=path, shipped=False) is None
    tuning.record(key(), CFG, cache_path=path)
    tuning.record(key(dtype=torch.float16), {**CFG, "num_stages": 2}, cache_path=path)
    assert tuning.lookup(key(), 384, 384, cache_path=path, shipped=False) == CFG
    assert tuning.lookup(key(dtype=torch.float16), 384, 384, cache_path=path, shipped=False)["num_stages"] == 2
    assert json.loads(path.read_text())["format"] == 1


@pytest.mark.parametrize("text", ["{not json", '{"configs": [1, 2]}', '["configs"]', ""])
def test_corrupt_cache_is_ignored_with_a_warning(tmp_path, text):
    path = tmp_path / "tuning.json"
    path.write_text(text)
    with pytest.warns(RuntimeWarning, match="corrupt"):
        assert tuning.lookup(key(), 384, 384, cache_path=path, shipped=False) is None
    tuning.record(key(), CFG, cache_path=path)                 # the next tuning rewrites it
    assert tuning.lookup(key(), 384, 384, cache_path=path, shipped=False) == CFG


def test_invalid_entry_is_ignored_with_a_warning(tmp_path):
    path = tmp_path / "tuning.json"
    bad = {key(): {**CFG, "BLOCK_M": 96}, key(head_dim=64): {"BLOCK_M": 64}}
    path.write_text(json.dumps({"format": 1, "configs": bad}))
    for k in bad:
        with pytest.warns(RuntimeWarning, match="invalid tuned config"):
            assert tuning.lookup(k, 384, 384, cache_path=path, shipped=False) is None
    # a tile that does not divide the plan's block is refused as well
    tuning.record(key(q_block=64), CFG, cache_path=path)
    with pytest.warns(RuntimeWarning, match="invalid"):
        assert tuning.lookup(key(q_block=64), 64, 384, cache_path=path, shipped=False) is None


def test_shipped_table_covers_h100_and_h200(tmp_path):
    table = tuning.load_table(tuning.SHIPPED_TABLE)
    assert table
    empty_cache = tmp_path / "none.json"
    for gpu in (H100, "NVIDIA H200"):
        for kernel, variant in (("fwd", BASE["variant"]), ("fwd", "tma0.ws0.peel1.lazy1"), ("dkdv", "tma1.skip0"), ("dq", "tma1")):
            k = key(gpu=gpu, kernel=kernel, variant=variant)
            assert tuning.lookup(k, 384, 384, cache_path=empty_cache, shipped=True) is not None, k
    assert tuning.lookup(key(gpu="NVIDIA A100-SXM4-80GB"), 384, 384, cache_path=empty_cache, shipped=True) is None
    # the single-pass backward is not measured yet: it must tune, not run an unmeasured config
    assert tuning.lookup(key(kernel="bwd1", variant="tma1.dqatomic.skip1"), 384, 384, cache_path=empty_cache,
                         shipped=True) is None
    assert tuning.lookup(key(), 384, 384, cache_path=empty_cache, shipped=False) is None
    for k, cfg in table.items():
        gpu, kernel, dtype, d, qb, kb, variant, version = k.split("|")
        assert kernel in ("fwd", "bwd1", "dkdv", "dq") and version == tuning.KERNEL_VERSION, k
        assert tuning._valid(cfg, int(qb[1:]), int(kb[1:])), k
    assert "to be re-measured" in json.loads(tuning.SHIPPED_TABLE.read_text())["note"].lower()


def test_disk_cache_wins_over_shipped_table(tmp_path):
    path = tmp_path / "tuning.json"
    mine = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    tuning.record(key(), mine, cache_path=path)
    assert tuning.lookup(key(), 384, 384, cache_path=path, shipped=True) == mine


def test_without_autotuning_only_the_first_row_is_used():
    from video_sparse_attn.kernels import triton_fwd

    rows = triton_fwd.FWD_CONFIGS["small_d"]
    launcher = tuning.tuned_kernel("fwd", triton_fwd._fwd_kernel, rows, q_block=64, k_block=32, dtype=torch.float32,
                                   head_dim=16, device=torch.device("cpu"), variant="x", autotune=True,
                                   tune_key=("D_PAD",))
    (config,) = launcher.tuner.configs
    assert config.kwargs == {"BLOCK_M": 64, "BLOCK_N": 32} and config.num_warps == rows[0][2]
    assert launcher.key is None                                # nothing would be recorded


def test_configure_autotune_off_takes_the_first_row(monkeypatch):
    from video_sparse_attn.kernels import triton_bwd, triton_common

    monkeypatch.setattr(triton_common, "INTERPRET", False)     # as on a GPU: only the switch stops tuning
    rows = triton_bwd.ONE_PASS_CONFIGS["small_d"]
    tuning.configure(autotune=False)
    try:
        assert tuning._state["autotune"] is False
        launcher = tuning.tuned_kernel("bwd1", triton_bwd._dkdv_kernel, rows, q_block=384, k_block=384,
                                       dtype=torch.bfloat16, head_dim=128, device=torch.device("cuda", 0),
                                       variant="tma1.dqatomic.skip1", autotune=True, tune_key=("D_PAD",))
        assert len(launcher.tuner.configs) == 1 and launcher.key is None
    finally:
        tuning.configure()
    assert tuning._state["autotune"] is True


@pytest.mark.interpreter
def test_warmup_runs_forward_and_backward_for_each_shape():
    from video_sparse_attn.warmup import _plan, warmup

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    times = warmup((1, 1, (2, 3, 5), 16, "float32", (32, 16)),
                   {"batch": 1, "heads": 2, "seq": 40, "head_dim": 16, "dtype": torch.float16, "block": 16},
                   device=dev, kernel_options={"autotune": False})
    assert len(times) == 2 and all(t > 0 for t in times)
    plan = _plan(100, 32, 16, "cpu")                      # ragged last blocks: the peeled paths compile too
    assert plan.q_valid[0, -1] == 4 and plan.k_valid[0, -1] == 4
    with pytest.raises(ValueError, match="warm-up shape"):
        warmup((1, 16, 1024, 128), device=dev)
    with pytest.raises(ValueError, match="unknown warm-up shape keys"):
        warmup({"batch": 1, "len": 5}, device=dev)


def test_first_tuned_launch_is_recorded_once(tmp_path):
    import triton

    from video_sparse_attn.kernels import triton_fwd

    cache = tmp_path / "tuning.json"
    tuning.configure(cache_path=str(cache), use_shipped_table=False)
    try:
        launcher = tuning._TunedKernel(triton_fwd._fwd_kernel, [(128, 64, 4, 3), (64, 64, 4, 2)], 384, 384,
                                       ("D_PAD",), None, key())
        assert len(launcher.tuner.configs) == 2 and launcher.key == key()
        calls = []

        class Tuned:                                   # stands in for the autotuner after its benchmark
            best_config = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2)

            def __getitem__(self, grid):
                return lambda *args, **kwargs: calls.append(grid)

        launcher.tuner = Tuned()
        launcher[(3, 1)]()
        assert tuning.lookup(key(), 384, 384) == {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
        cache.write_text("{}")                         # a second launch must not write again
        launcher[(3, 1)]()
        assert calls == [(3, 1), (3, 1)] and cache.read_text() == "{}"
    finally:
        tuning.configure()
