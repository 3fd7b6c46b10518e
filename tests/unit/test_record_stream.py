"""The record stream reads each file once per pass in a process, whatever the number of slots splitting it, and
gives every slot exactly the records it got when each slot read its files alone."""

import collections
import gzip
import zlib

import numpy as np
import pytest

import sd.data.record_stream as rs
from sd.data.formats import BadRecord
from sd.data.record_stream import RecordSource, RecordStream, ResumePoint, choose_source


def alone_pass_records(self, pass_no):
    """``_ListReader._pass_records`` when every slot read its files itself (the reference for the data order)."""
    order = np.random.default_rng([self.seed, self.list_index, pass_no]).permutation(len(self.files))
    if self.by_file:
        files = [self.files[i] for i in order[self.slot :: self.num_slots]]
    else:
        files = [self.files[order[self.slot % len(self.files)]]]
    for path in files:
        source, mark, kept = choose_source(path, self.sources), self._coverage_mark, 0
        try:
            for index, record in enumerate(source.read(path)):
                if self.by_file or index % self.sharers == self.share:
                    kept += 1
                    yield source, record
        except FileNotFoundError:
            self._skip_file("missing_file", path, "is missing; skipped")
        except (PermissionError, IsADirectoryError, NotADirectoryError) as err:
            self._skip_file("unreadable_file", path, f"cannot be read ({err}); skipped")
        except (EOFError, OSError, zlib.error) as err:
            self._skip_file("truncated_file", path, f"is truncated or corrupt ({err}); rest of the file skipped")
        (self.empty.add if kept == 0 else self.empty.discard)(path)
        if mark == self._coverage_mark:
            self.covered.add(path)


def make(source, record, rng):
    if b"bad" in record:
        raise BadRecord("bad_image")
    return {"record": record, "draw": float(rng.random())}


def check(source, record):
    if b"bad" in record:
        raise BadRecord("bad_image")


def write_lists(root, rng, n_lists, files_per_list, weighted):
    """Lists of gzip part files of random length (some empty, some truncated, some records bad, one missing)."""
    lists = []
    for k in range(n_lists):
        files = []
        for f in range(files_per_list[k]):
            path = root / f"l{k}-f{f}.gz"
            lines = [f"l{k} f{f} r{i}{' bad' if rng.random() < 0.1 else ''}\n"
                     for i in range(int(rng.integers(0, 40)) if f else int(rng.integers(12, 40)))]
            with gzip.open(path, "wt") as out:
                out.writelines(lines)
            if f and rng.random() < 0.15:  # truncated: the records before the cut count
                data = path.read_bytes()
                path.write_bytes(data[: len(data) * 2 // 3])
            files.append(str(path))
        if files_per_list[k] > 2 and rng.random() < 0.3:
            files.append(str(root / f"l{k}-missing.gz"))
        lists.append((f"list{k}", float(rng.uniform(0.5, 2)) if weighted else None, files))
    return lists


def run_slots(stream, slots, samples, resume=None, shared=True, rng=None):
    """Per slot, ``samples`` of ``(record, draw, pass, position, bad, skips)``; slots advanced in bursts of
    random length in a random order (``rng``) or one slot after another. ``resume``: slot → ResumePoint."""
    reads = stream.shared_reads(slots) if shared else None
    gens = {j: stream.samples(j, (resume or {}).get(j), make, check, reads) for j in slots}
    out = {j: [] for j in slots}
    while True:
        waiting = [j for j in slots if len(out[j]) < samples]
        if not waiting:
            break
        j = waiting[int(rng.integers(len(waiting)))] if rng is not None else waiting[0]
        for _ in range(1 if rng is None else int(rng.integers(1, 12))):
            if len(out[j]) < samples:
                sample, epoch, state = next(gens[j])
                out[j].append((sample["record"], sample["draw"], epoch, state.position, state.bad,
                               dict(state.skipped)))
    for g in gens.values():
        g.close()
    return out


@pytest.mark.parametrize("case", range(12))
def test_slots_get_what_they_got_reading_alone(tmp_path, monkeypatch, case):
    """Randomized lists (fewer files than slots, more, weights, shuffle buffers, lagging slots, a tiny queue
    limit that detaches slots, resume from mid-pass): every slot's samples, positions and skip counts are those
    of the slot reading its files alone."""
    rng = np.random.default_rng(case)
    num_slots = int(rng.integers(2, 10))
    n_lists = int(rng.integers(1, 3))
    files = [int(rng.choice([1, 2, 3, num_slots + int(rng.integers(0, 3))])) for _ in range(n_lists)]
    lists = write_lists(tmp_path, rng, n_lists, files, weighted=bool(rng.random() < 0.5))
    buffer = int(rng.choice([1, 4, 16]))
    stream = RecordStream(lists, seed=case, num_slots=num_slots, shuffle_buffer=buffer)
    if case % 3 == 0:  # a queue of 2 records: slots detach and read the rest of a file themselves
        monkeypatch.setattr(RecordStream, "shared_reads", lambda self, slots: rs.SharedReads(slots, queue_limit=2))
    slots = sorted(rng.choice(num_slots, size=int(rng.integers(1, num_slots + 1)), replace=False).tolist())
    steps, resume, whole = 60, None, None
    if case % 2:  # resumed at the mid-pass positions of a reference run
        with monkeypatch.context() as m:
            m.setattr(rs._ListReader, "_pass_records", alone_pass_records)
            whole = run_slots(RecordStream(lists, case, num_slots, buffer), slots, 17 + steps, shared=False)
        resume = {j: ResumePoint(17, whole[j][16][3]) for j in slots}
    shared = run_slots(stream, slots, steps, resume, rng=rng)
    with monkeypatch.context() as m:
        m.setattr(rs._ListReader, "_pass_records", alone_pass_records)
        alone = run_slots(RecordStream(lists, case, num_slots, buffer), slots, steps, resume, shared=False)
    assert shared == alone
    if whole is not None:  # and the resumed streams continue the uninterrupted ones (skip counts aside)
        assert {j: [s[:4] for s in v] for j, v in shared.items()} == {j: [s[:4] for s in v[17:]]
                                                                        for j, v in whole.items()}


def test_resumed_shared_slots_equal_reading_alone(tmp_path, monkeypatch):
    """Slots resumed together at mid-pass positions (exact and by sample count) read as each slot alone would."""
    rng = np.random.default_rng(7)
    lists = write_lists(tmp_path, rng, 2, [2, 3], weighted=True)
    stream = RecordStream(lists, seed=3, num_slots=8, shuffle_buffer=4)
    first = run_slots(stream, list(range(8)), 23, rng=rng)
    for positions in (True, False):
        resume = {j: ResumePoint(23, first[j][-1][3] if positions else None) for j in range(8)}
        shared = run_slots(stream, list(range(8)), 30, resume, rng=rng)
        with monkeypatch.context() as m:
            m.setattr(rs._ListReader, "_pass_records", alone_pass_records)
            alone = run_slots(stream, list(range(8)), 30, resume, shared=False)
        assert shared == alone


@pytest.fixture
def counting_source():
    """A ``.rec`` source (one record a line) that counts the openings and the records read of each file."""
    opens, reads = collections.Counter(), collections.Counter()

    def read(path):
        opens[path] += 1
        with open(path, "rb") as f:
            for line in f:
                reads[path] += 1
                yield line

    return opens, reads, RecordSource("counting", (".rec",), read, None)


@pytest.mark.parametrize("n_files,num_slots,workers", [(1, 8, 1), (3, 8, 2), (1, 16, 2), (5, 8, 1), (2, 3, 1)])
def test_each_file_read_once_per_pass_per_process(tmp_path, counting_source, monkeypatch, n_files, num_slots,
                                                   workers):
    """Fewer files than slots: a process opens and reads each file once per pass whatever the slot count (the
    slots split it by record), where each slot reading alone opened it once per slot."""
    opens, reads, source = counting_source
    per_file = 24
    files = []
    for f in range(n_files):
        path = tmp_path / f"part-{f}.rec"
        path.write_bytes(b"".join(b"f%d r%d\n" % (f, i) for i in range(per_file)))
        files.append(str(path))
    started = set()  # (process, slot or None, the slot's file this pass, pass): the readings a pass needs
    pass_records = rs._ListReader._pass_records

    def spy(self, pass_no):
        started.add((process, self.slot if alone else None, self.slot % len(self.files), pass_no))
        return pass_records(self, pass_no)

    monkeypatch.setattr(rs._ListReader, "_pass_records", spy)
    stream = RecordStream([("list", None, files)], seed=0, num_slots=num_slots, shuffle_buffer=4, sources=(source,))
    processes = [list(range(num_slots))[w * num_slots // workers:(w + 1) * num_slots // workers]
                 for w in range(workers)]
    for alone in (False, True):
        opens.clear(), reads.clear(), started.clear()
        for process, slots in enumerate(processes):  # loader workers, each with its own reads
            shared = None if alone else stream.shared_reads(slots)
            gens = [stream.samples(j, None, make, check, shared) for j in slots]
            for _ in range(40):  # lock step, as a step's samples are taken
                for g in gens:
                    next(g)
            for g in gens:
                g.close()
        assert max(p for *_, p in started) >= 2  # several passes
        assert sum(opens.values()) == len(started)  # one opening per reading a pass needs
        assert sum(reads.values()) <= len(started) * per_file
        if not alone:
            readings = len(started)
    assert len(started) > readings  # slots reading alone opened the files once per slot


def test_a_detached_slot_reads_only_the_rest_and_memory_stays_bounded(tmp_path, counting_source):
    """A slot that never takes its records does not make the others keep them beyond the queue limit."""
    opens, _, source = counting_source
    path = tmp_path / "part.rec"
    path.write_bytes(b"".join(b"r%d\n" % i for i in range(400)))
    stream = RecordStream([("list", None, [str(path)])], seed=0, num_slots=4, shuffle_buffer=1, sources=(source,))
    reads = rs.SharedReads(range(4), queue_limit=10)
    gens = [stream.samples(j, None, make, check, reads) for j in range(4)]
    most = 0
    for _ in range(80):  # slot 3 is never asked for a sample
        for g in gens[:3]:
            next(g)
        most = max(most, max(reads.queued.values()))
    assert most <= 10
    assert opens[str(path)] == 1
    late = [next(gens[3])[0]["record"] for _ in range(30)]  # its 10 queued, then the rest read alone
    assert late == [b"r%d\n" % (3 + 4 * i) for i in range(30)]
    assert opens[str(path)] == 2
