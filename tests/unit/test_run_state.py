"""sd_state.json through its owner: the file the trainer has always written, read back typed, and one line
for each way a state file can be wrong."""

import json
import os

import pytest

from sd.runtime.checkpoints import STATE_FILE
from sd.runtime.run_state import DataOrder, Layout, RunState

# What the trainer's dict literal wrote for a 2-rank run of global batch 4 (its keys and their order).
WRITTEN = {
    "global_batch": 4,
    "slots": {str(j): {"position": 7 + j, "skipped": j % 2} for j in range(4)},
    "steps": 6,
    "layout": {"ranks": 2, "accumulation": 1, "per_device_batch": 2},
    "data_order": {"seed": 42, "file_list": "/data/filelist/train.filelist.list", "shuffle_buffer": 64},
    "ema_updates": 6,
    "resolution": 32,
    "model_paths": {"vae": "/kit/vae", "text_encoder": "/kit/text_encoder", "tokenizer": "/kit/tokenizer",
                    "unet": "/kit/unet/config.json", "scheduler": "CompVis/stable-diffusion-v1-4/scheduler"},
    "prediction_type": "v_prediction",
}


def state():
    w = WRITTEN
    return RunState(global_batch=4, slots=json.loads(json.dumps(w["slots"])), steps=6,
                    layout=Layout(ranks=2, accumulation=1, per_device_batch=2),
                    data_order=DataOrder(**w["data_order"]), ema_updates=6, resolution=32,
                    model_paths=dict(w["model_paths"]), prediction_type="v_prediction")


def test_written_bytes_and_read_back(tmp_path):
    path = state().write(str(tmp_path))
    assert path == str(tmp_path / STATE_FILE)
    assert (tmp_path / STATE_FILE).read_text() == json.dumps(WRITTEN, indent=2)  # the same file as before
    assert RunState.read(str(tmp_path)) == state()
    (tmp_path / STATE_FILE).write_text(json.dumps(WRITTEN))  # a checkpoint written by the dict literal
    assert RunState.read(str(tmp_path)) == state()


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("resolution"), "sd_state.json lacks resolution: not a state file of this version"),
    (lambda d: d.update(extra=1), "sd_state.json has unknown field\\(s\\) extra"),
    (lambda d: d.pop("global_batch"), "sd_state.json holds no slot positions .*--overwrite_output_dir"),
    (lambda d: d.update(prediction_type="sample"), "sd_state.json: prediction_type 'sample' is not one of"),
    (lambda d: d.update(global_batch=8), "sd_state.json: layout .* does not make the global batch 8"),
    (lambda d: d["slots"]["1"].pop("skipped"), "sd_state.json: slot '1' is not"),
    (lambda d: d.update(steps=-1), "sd_state.json: steps -1 is not a whole number"),
    (lambda d: d.update(resolution=True), "sd_state.json: resolution True is not a positive integer"),
    (lambda d: d["layout"].pop("ranks"), "sd_state.json: layout or data_order does not have the fields"),
    (lambda d: d["data_order"].update(seed="5"), "sd_state.json: data_order .* is not"),
])
def test_a_wrong_field_is_one_line_naming_the_file(tmp_path, change, message):
    written = json.loads(json.dumps(WRITTEN))
    change(written)
    (tmp_path / STATE_FILE).write_text(json.dumps(written))
    with pytest.raises(ValueError, match=message) as e:
        RunState.read(str(tmp_path))
    assert str(tmp_path / STATE_FILE) in str(e.value) and "\n" not in str(e.value)


def test_no_file_or_not_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} is not a checkpoint of this trainer \\(no sd_state"):
        RunState.read(str(tmp_path))
    (tmp_path / STATE_FILE).write_text('{"global_batch": 4,')  # cut short
    with pytest.raises(ValueError, match=f"{os.path.join(tmp_path, STATE_FILE)} is not valid JSON"):
        RunState.read(str(tmp_path))
