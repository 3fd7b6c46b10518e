"""Streaming safetensors files (sd/runtime/tensor_files.py): the library reads what we write, we read what it
writes, an optimizer state comes back equal, and writing holds one tensor at a time."""

import numpy as np
import paddle
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from sd.runtime import tensor_files


def _tensors():
    rng = np.random.default_rng(0)
    return {"b.weight": paddle.to_tensor(rng.standard_normal((3, 5)).astype("float32")),
            "a.bias": paddle.to_tensor(rng.standard_normal(7).astype("float16")),
            "step": paddle.to_tensor(np.array(12, dtype=np.int64)),
            "bf": paddle.to_tensor([1.5, -2.25, 3.0], dtype="float32").astype("bfloat16"),
            "mask": paddle.to_tensor(np.array([True, False, True]))}


def test_the_safetensors_library_reads_the_file_bytes_equal_to_its_own(tmp_path):
    tensors = _tensors()
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    tensor_files.save_tensors(tensors, str(ours), {"format": "pd"})
    # (the library's numpy writer takes neither bfloat16 nor, under numpy 2, bool)
    save_file({k: v.numpy() for k, v in tensors.items() if k not in ("bf", "mask")}, str(theirs),
              metadata={"format": "pd"})
    with safe_open(str(ours), framework="numpy") as f:
        assert f.metadata() == {"format": "pd"}
        assert sorted(f.keys()) == sorted(tensors)
        for name in tensors:
            if name not in ("bf", "mask"):  # no bfloat16 in numpy, bool unread under numpy 2: our reader below
                got, want = f.get_tensor(name), np.asarray(tensors[name].numpy())
                assert list(got.shape) == list(tensors[name].shape) and got.dtype == want.dtype, name
                assert got.reshape(-1).tolist() == want.reshape(-1).tolist(), name
    read = dict(tensor_files.iter_tensors(str(theirs)))  # and we read the library's files
    for name, array in read.items():
        want = np.asarray(tensors[name].numpy())
        assert array.dtype == want.dtype and array.reshape(-1).tolist() == want.reshape(-1).tolist(), name
    np.testing.assert_array_equal(dict(tensor_files.iter_tensors(str(ours)))["mask"], [True, False, True])
    bf = dict(tensor_files.iter_tensors(str(ours)))["bf"]
    assert bf.dtype == np.uint16
    np.testing.assert_array_equal(paddle.to_tensor(bf).astype("float32").numpy(), [1.5, -2.25, 3.0])


def test_an_optimizer_state_comes_back_equal(tmp_path):
    x = paddle.to_tensor(np.random.default_rng(1).standard_normal((2, 4)).astype("float32"))

    def model_and_optimizer(steps, state=None, weights=None):
        """A layer and AdamW after ``steps`` updates, in a fresh naming scope (names as in a new process)."""
        with paddle.utils.unique_name.guard():
            paddle.seed(0)
            layer = paddle.nn.Linear(4, 3)
            opt = paddle.optimizer.AdamW(learning_rate=paddle.optimizer.lr.StepDecay(0.1, 2),
                                         parameters=layer.parameters())
            if state is not None:
                layer.set_state_dict(weights)
                opt.set_state_dict(state)
            for _ in range(steps):
                layer(x).sum().backward()
                opt.step()
                opt.clear_grad()
                opt._learning_rate.step()
        return layer, opt

    layer, opt = model_and_optimizer(3)
    state = opt.state_dict()
    path = str(tmp_path / "optimizer.pdopt")
    tensor_files.save_state(state, path)
    assert tensor_files.is_safetensors(path)
    back = tensor_files.load_state(path)
    assert back.keys() == state.keys()
    assert back["LR_Scheduler"] == state["LR_Scheduler"]
    for name, value in state.items():
        if isinstance(value, paddle.Tensor):
            assert back[name].dtype == value.dtype
            np.testing.assert_array_equal(back[name].numpy(), value.numpy())
    # resumed from the file, two more updates land where five uninterrupted ones do
    resumed, _ = model_and_optimizer(2, back, layer.state_dict())
    straight, _ = model_and_optimizer(5)
    np.testing.assert_array_equal(resumed.weight.numpy(), straight.weight.numpy())


def test_a_pickled_file_is_not_taken_for_safetensors(tmp_path):
    path = str(tmp_path / "old.pdopt")
    paddle.save({"w": paddle.ones([2])}, path)
    assert not tensor_files.is_safetensors(path)
    with pytest.raises(ValueError, match="not a safetensors file|was not written by"):
        tensor_files.load_state(path)


def test_writing_converts_one_tensor_at_a_time(tmp_path, monkeypatch):
    """The host copies are released as the file is written: at most one is alive at any moment."""
    alive, peak = [0], [0]

    class Tracked(np.ndarray):
        def __del__(self):
            alive[0] -= 1

    class FakeTensor:
        def __init__(self, n):
            self.shape, self.dtype = [n], "paddle.float32"

        def cpu(self):
            return self

        def numpy(self):
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
            return np.arange(self.shape[0], dtype=np.float32).view(Tracked)

    tensor_files.save_tensors({f"t{i}": FakeTensor(1000 + i) for i in range(5)}, str(tmp_path / "x.safetensors"))
    assert peak[0] == 1
    with safe_open(str(tmp_path / "x.safetensors"), framework="numpy") as f:
        np.testing.assert_array_equal(f.get_tensor("t3"), np.arange(1003, dtype=np.float32))


def test_memmap_views_hold_the_same_values(tmp_path):
    """load_state(memmap=True): read-only numpy views of the file, equal to the saved tensors (misaligned
    offsets included: a float16 tensor of odd length before a float32 one)."""
    state = {"a": paddle.to_tensor(np.arange(3, dtype=np.float16)), "b": paddle.to_tensor(np.ones((2, 2), "float32")),
             "nested": {"c": paddle.to_tensor(np.array([7], dtype=np.int64))}, "n": 3}
    path = str(tmp_path / "s.safetensors")
    tensor_files.save_state(state, path)
    back = tensor_files.load_state(path, memmap=True)
    assert back["n"] == 3 and isinstance(back["b"], np.ndarray) and not back["b"].flags.writeable
    for got, want in ((back["a"], state["a"]), (back["b"], state["b"]), (back["nested"]["c"], state["nested"]["c"])):
        np.testing.assert_array_equal(got, want.numpy())
    target = paddle.zeros([2, 2])
    target.set_value(back["b"])  # what the optimizer does with a loaded moment
    np.testing.assert_array_equal(target.numpy(), np.ones((2, 2)))
