"""One logging path: the dataset, the trainer and the tools log through ``sd.log`` in one format."""

import logging
import os
import re
import subprocess

import pytest

from sd.data.formats import encode_part_line, iter_part_file, read_filelist, read_filelist_list, write_filelists
from sd.log import logger
from tests.helpers.common import ROOT, train_command

LINE = re.compile(r"\[\d{4}-\d\d-\d\d [\d:,]+\] \[ *(INFO|WARNING)\](?:\x1b\[0m)? - ")  # paddlenlp's format


def one_part_with_bad_records(demo_file_list, folder, n_good=10):
    """A list of ONE part file (so the slots of a global batch share it by record): n_good demo records, 2 bad lines."""
    part = read_filelist(read_filelist_list(demo_file_list)[0].path)[0].path
    good = [raw for _, raw in zip(range(n_good), iter_part_file(part))]
    lines = good[:5] + [b"only\ttwo\n"] + good[5:] + [b"x\tNONE\t \n"]
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "part-00000")
    with open(path, "wb") as f:
        f.writelines(lines)
    return write_filelists(folder, "one", [path])[1]


def test_dataset_lines_reach_stderr_whatever_the_root_logger_says(tmp_path, tokenizer, capsys):
    """Another library's root-logger setup (here: only CRITICAL, to a handler of its own) changes nothing."""
    from sd.text_image_pair_dataset import TextImagePairDataset

    (tmp_path / "p").write_text("".join(encode_part_line(f"c {i}", b"\xff") for i in range(4)))
    fl = write_filelists(str(tmp_path), "x", [str(tmp_path / "p")])[1]
    root = logging.getLogger()
    other = logging.StreamHandler(open(os.devnull, "w"))
    old_level = root.level
    root.addHandler(other)
    root.setLevel(logging.CRITICAL)
    try:
        d = TextImagePairDataset(fl, tokenizer, resolution=32, slots=[0], num_slots=2, shuffle_buffer=1)
        with pytest.raises(RuntimeError, match="no usable sample"):  # every record is bad: it gives up
            next(iter(d))
    finally:
        root.removeHandler(other)
        root.setLevel(old_level)
        other.stream.close()
    err = capsys.readouterr().err
    notice = [line for line in err.splitlines() if "sharding it by record instead of by file" in line]
    assert len(notice) == 1 and LINE.search(notice[0]), err[-2000:]
    assert any("pass 0 of" in line and "bad_image" in line for line in err.splitlines()), err[-2000:]


def test_trainer_and_tools_share_the_logger():
    import sd.sd_trainer
    import train_txt2img_laion400m_trainer as entry

    assert sd.sd_trainer.logger is logger and entry.logger is logger


def test_training_run_shows_the_shard_notice_and_pass_summaries(tiny_kit, demo_file_list, tmp_path):
    """A default training run, its one-file list sharded by record over the 4 slots of its batch, read by 2
    loader workers: the dataset's lines from inside the workers are in the run's output, in the trainer's format."""
    fl = one_part_with_bad_records(demo_file_list, str(tmp_path / "data"))
    cmd = train_command(tiny_kit, fl, tmp_path / "run", "--max_steps", "3", "--dataloader_num_workers", "2",
                        "--shuffle_buffer", "1", "--report_to", "none", "--image_logging_steps", "0",
                        "--save_steps", "100")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    log = (r.stdout + r.stderr).splitlines()
    assert r.returncode == 0, "\n".join(log[-40:])
    notice = [line for line in log if "sharding it by record instead of by file" in line]
    passes = [line for line in log if re.search(r"slot \d: pass \d+ of .*one\.filelist done", line)]
    losses = [line for line in log if " - loss: " in line]
    assert len(notice) == 1, "\n".join(log[-60:])  # slot 0 only
    assert passes and any("too_few_fields" in line or "empty_image" in line for line in passes), "\n".join(log[-60:])
    assert losses and all(LINE.search(line) for line in notice + passes + losses[:1]), notice + passes + losses[:1]
