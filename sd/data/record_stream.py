"""The record stream: file lists → endless, sharded, shuffled, resumable streams of records, one per slot.

What a stream is (the contract with the trainer is in docs/ARCHITECTURE.md):

* **Slots.** A global batch of G samples has G slots; slot j is a stream of its own, and step t's
  global batch is the t-th usable sample of every slot. Which rank, micro-batch or loader worker reads
  a slot does not matter: the stream of slot j is a function of (seed, j, G, file lists) only. A
  ``.filelist`` with F ≥ G entries is split by file (each pass, every slot shuffles the entries the
  same way and slot j reads entries j, j+G, ...); one with F < G is split by record within files
  (slot j reads entry j mod F of the pass's order and keeps its records i ≡ j div F (mod n), n being
  the number of slots reading that entry), which is logged once. Either way the slots are disjoint
  and together complete, and each gets about one F-th or G-th of the data. The slots streamed in one
  process (a loader worker's) that split a file read it once per pass (``SharedReads``): each gets its
  records as if it read the file alone, so nothing of a stream depends on which slots share a process.
* **Draws.** A slot's stream is a sequence of draws: pick a ``.filelist`` (by weight, or
  uniformly), put its next record into the slot's shuffle buffer of undecoded records, take a
  random one out. Each list repeats forever, its file order reshuffled every pass. Draw ``i`` uses
  randomness from ``(seed, slot, i)`` (also what the sample's crop and caption dropout draw) and
  the pass order from ``(seed, list, pass)``. A stream's **position** is the number of draws made,
  i.e. records read.
* **Resume** (``ResumePoint``): the draws of the samples already consumed are replayed, reading
  records but decoding no image: to a saved position (exact), or by counting usable samples with a
  cheap check per record.
* **Bad data** is skipped and counted by reason (``SKIP_REASONS``): records the decoder rejects
  (``BadRecord(reason)``), part files missing, unreadable or truncated (also when they vanish
  mid-run: counted once per pass, logged once; a remote one that stays unreachable after its retries
  likewise, as ``unreachable_file``; the retries of remote reads are counted as ``retry_*``). A summary
  is logged every ``report_every`` skips,
  at the end of each pass of a list and when the stream ends; ``max_bad_fraction`` turns too much
  bad data into an error; every file of every list read through (and two of a slot's longest
  passes) without one usable record is an error, never an endless loop. A pass may give a slot
  nothing (its one file vanished, say); a list that gave it nothing from any of its files is
  dropped (logged) while other lists still give records; when none does, the stream raises.

**Record sources** (how to read a new kind of file). The reader of a listed file is chosen by its
name: the registered ``RecordSource`` with the longest matching suffix, else ``PART_FILES`` (plain
or ``.gz`` text, one record a line). A source has

* ``read(path) → iterator of records``, one at a time, in a fixed order (positions and sharding by
  record count them). It raises ``FileNotFoundError``, ``PermissionError``/``IsADirectoryError``, or
  ``EOFError``/``OSError``/``zlib.error`` (truncated or corrupt: the rest of the file is skipped) as
  the file demands; records read before an error count.
* ``decode(record, line_format, options) → (caption, image bytes)``, raising
  ``sd.data.formats.BadRecord(reason)``
  for a record that cannot be used (a reason of ``SKIP_REASONS``; new reasons go at its end).

A stream reads the sources it is given, chosen by file name (``RecordStream(..., sources=...)``; the kinds
training reads are in ``sd/data/sources.py``). The stream itself never decodes: the dataset's per-record
function receives ``(source, record)`` and calls the decoder.
"""

from __future__ import annotations

import collections
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from sd.data import remote
from sd.data.formats import BadRecord, decode_part_record, iter_part_file
from sd.log import logger

# Skip reasons, in the order of the counts in a batch's ``skip_counts`` (see collate_fn). File reasons
# count a part file once per pass in which it could not be read: ``missing_file`` (gone, e.g. deleted
# mid-run), ``unreadable_file`` (no permission, a directory), ``truncated_file`` (truncated or corrupt:
# the rest of that file is skipped). New reasons go at the end.
SKIP_REASONS = ("empty_line", "not_text", "too_few_fields", "bad_json", "no_caption", "empty_image", "bad_base64",
                "bad_image", "too_small", "missing_file", "truncated_file", "unreadable_file",
                "bad_latent",  # bad_latent: a record of precomputed latents (sd/latent_dataset.py) that does not parse
                # img2dataset shards (sd/data/img2dataset.py): metadata filters, failed URLs
                "filtered", "not_downloaded",
                # remote files (sd/data/remote.py): one that stayed unreachable (counted as a file), and the
                # retries of transient failures (each retried read, not a record lost)
                "unreachable_file", *remote.RETRY_REASONS)
FILE_REASONS = ("missing_file", "unreadable_file", "truncated_file", "unreachable_file")


# ---------------------------------------------------------------------------------------------
# Record sources: which reader and decoder a listed file gets
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecordSource:
    """How to read one kind of listed file (see the module docstring for the contract)."""

    name: str
    suffixes: Tuple[str, ...]  # file names ending so are read by this source
    read: Callable[[str], Iterator[Any]]  # path → records, one at a time
    # (record, line_format, the dataset's options for this kind of file, e.g. img2dataset's ShardOptions)
    decode: Callable[[Any, str, Any], Tuple[str, bytes]]  # → (caption, image bytes)


def _decode_part(record: bytes, line_format: str, options=None):
    return decode_part_record(record, line_format)  # part files take no options


PART_FILES = RecordSource("part file", (".gz",), iter_part_file, _decode_part)  # also every unmatched name
def choose_source(path: str, sources: Sequence[RecordSource]) -> RecordSource:
    """The source of ``sources`` that reads ``path``: the longest matching suffix, else part files."""
    best, length = PART_FILES, 0
    for source in sources:
        for suffix in source.suffixes:
            if len(suffix) > length and path.endswith(suffix):
                best, length = source, len(suffix)
    return best


# ---------------------------------------------------------------------------------------------
# Resume points and the state of one stream
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed slot stream continues: after ``samples_consumed`` samples (one per optimizer step),
    at ``position`` draws when known (exact whatever the data), else by counting usable samples."""

    samples_consumed: int
    position: Optional[int] = None

    def __post_init__(self):
        if self.samples_consumed < 0 or (self.position is not None and self.position < self.samples_consumed):
            raise ValueError(f"bad resume point: samples_consumed={self.samples_consumed}, position={self.position}")


@dataclass
class StreamState:
    """The counters of one slot's stream (its sequence of draws)."""

    slot: int
    lists: int  # number of file lists
    skip_draws: Optional[int] = None  # resume to a saved position: draws replayed without a look
    skip_samples: int = 0  # resume by sample count: usable records replayed with the cheap check
    position: int = 0  # draws made = records read into the shuffle buffer
    produced: int = 0  # usable records taken out (samples given, or replayed on resume)
    examined: int = 0  # records taken out and looked at
    bad: int = 0  # of those, skipped
    reported: int = 0  # skips at the last periodic summary
    skipped: collections.Counter = field(default_factory=collections.Counter)  # reason → records/files skipped
    bad_since_good: List[int] = field(init=False)  # per list: bad records since the last usable one
    alive: np.ndarray = field(init=False)  # per list: still gives this slot records

    def __post_init__(self):
        self.bad_since_good = [0] * self.lists
        self.alive = np.ones(self.lists, dtype=bool)

    @property
    def replaying(self) -> bool:
        """Still replaying what the interrupted run consumed (resume)."""
        return (self.skip_draws is not None and self.position < self.skip_draws) or self.produced < self.skip_samples

    def stream_state(self) -> np.ndarray:
        """int64 ``[slot, draws made, records skipped]``: what a sample carries for an exact resume."""
        return np.array([self.slot, self.position, self.bad], dtype=np.int64)


class UnusableData(RuntimeError, ValueError):
    """The data gives nothing (or too little) to train on: a problem of the user's data, reported in one line."""


class _NoRecords(RuntimeError):
    """A list gives a slot no record in a whole pass (its files are gone, empty or too few)."""


# ---------------------------------------------------------------------------------------------
# Reading a file once for all the slots of a process that split it by record
# ---------------------------------------------------------------------------------------------
class _FileShare:
    """One reading of a file in one pass, fanned out by record index to the local slots that split it.

    Record ``i`` belongs to the slot whose share is ``i mod sharers``; the records of a local slot wait
    in its queue until it takes them, those of slots streamed elsewhere are dropped. A slot whose queue
    would pass the limit is detached: it takes what is queued, then reads the rest of the file itself,
    from the first record it was not given (memory stays bounded however far apart the slots drift).
    The error that ends the reading (missing, unreadable, truncated file) reaches each attached slot
    after its last record, as it would have reading the file alone.
    """

    def __init__(self, path: str, source: RecordSource, sharers: int, shares: Dict[int, int], reads: SharedReads):
        self.path, self.source, self.sharers, self.reads = path, source, sharers, reads
        self.slot_of = shares  # share → local slot
        self.queues: Dict[int, collections.deque] = {share: collections.deque() for share in shares}
        self.attached = set(shares)  # shares still fed by this reading
        self.resume_at: Dict[int, int] = {}  # detached share → index of its first record not queued
        self.pending = set(shares)  # shares not done with this file yet
        self._records: Optional[Iterator[Any]] = None  # opened on the first record asked for
        self.index = 0  # records read so far
        self.done = False
        self.error: Optional[BaseException] = None  # what ended the reading, if not the end of the file

    def _read_one(self) -> None:
        """Read the next record into its owner's queue (or drop it), or end the reading."""
        try:
            if self._records is None:
                self._records = iter(self.source.read(self.path))
            record = next(self._records)
        except StopIteration:
            self.done = True
            return
        except (EOFError, OSError, zlib.error) as err:  # the file errors _ListReader counts: each slot gets it
            self.done, self.error = True, err
            return
        share = self.index % self.sharers
        if share in self.attached:
            slot = self.slot_of[share]
            if self.reads.queued[slot] >= self.reads.queue_limit:
                self.attached.discard(share)
                self.resume_at[share] = self.index
            else:
                self.queues[share].append(record)
                self.reads.queued[slot] += 1
        self.index += 1

    def records(self, share: int) -> Iterator[Any]:
        """The records of ``share`` in file order; raises what ended the file's reading, as reading it alone."""
        queue, slot = self.queues[share], self.slot_of[share]
        try:
            while True:
                if queue:
                    self.reads.queued[slot] -= 1
                    yield queue.popleft()
                elif share not in self.attached or self.done:
                    break
                else:
                    self._read_one()
            if share in self.attached:
                if self.error is not None:
                    raise self.error
                return
            for index, record in enumerate(self.source.read(self.path)):  # detached: the rest, alone
                if index >= self.resume_at[share] and index % self.sharers == share:
                    yield record
        finally:
            self.leave(share)

    def leave(self, share: int) -> None:
        """``share`` is done with this file (or its stream ended): free its queue, and the file when all are."""
        self.reads.queued[self.slot_of[share]] -= len(self.queues[share])
        self.queues[share].clear()
        self.attached.discard(share)
        self.pending.discard(share)
        if not self.pending:
            self.reads.finished(self)
            close = getattr(self._records, "close", None)
            if close is not None:
                close()


class SharedReads:
    """The file readings of the slots streamed in one process (a loader worker): each file a list splits by
    record is read once per pass, whatever the number of slots sharing it (see ``_FileShare``).

    Args:
        slots: the slots streamed here (their records are kept for them; the other slots' are dropped).
        queue_limit: records at most waiting for one slot (a slot further behind reads the file itself).
    """

    def __init__(self, slots: Sequence[int], queue_limit: int = 1024):
        self.slots, self.queue_limit = set(slots), queue_limit
        self.queued: collections.Counter = collections.Counter()  # slot → records waiting in its queues
        self._files: Dict[tuple, _FileShare] = {}  # (list, pass, first slot) → the file's reading
        self._left: set = set()  # slots whose stream ended: nothing is kept for them any more

    def records(self, reader: _ListReader, pass_no: int, path: str, source: RecordSource) -> Iterator[Any]:
        """``reader``'s records of ``path`` (its file of pass ``pass_no``): those of index ≡ its share
        (mod its sharers), in file order."""
        files, slots = len(reader.files), reader.num_slots
        first = reader.slot % files  # the slots first, first + F, ... read this file in this pass
        key = (reader.list_index, pass_no, first)
        share = self._files.get(key)
        if share is None:
            local = {j // files: j for j in range(first, slots, files) if j in self.slots and j not in self._left}
            share = self._files[key] = _FileShare(path, source, reader.sharers, local, self)
        if reader.share not in share.pending:  # not a slot of this process, or its stream started again
            share = _FileShare(path, source, reader.sharers, {reader.share: reader.slot}, self)
        return share.records(reader.share)

    def finished(self, share: _FileShare) -> None:
        for key, value in list(self._files.items()):
            if value is share:
                del self._files[key]

    def leave(self, slot: int) -> None:
        """``slot``'s stream ended: free what waits for it and keep nothing more for it."""
        self._left.add(slot)
        for share in list(self._files.values()):
            for s, j in share.slot_of.items():
                if j == slot and s in share.pending:
                    share.leave(s)


# ---------------------------------------------------------------------------------------------
# One file list as an endless, sharded record source
# ---------------------------------------------------------------------------------------------
class _ListReader:
    """Records of one ``.filelist`` for one slot, pass after pass: ``(source, record)``."""

    def __init__(self, name: str, files: List[str], slot: int, num_slots: int, seed: int, list_index: int,
                 skipped: collections.Counter, shared: SharedReads, sources: Sequence[RecordSource] = (PART_FILES,)):
        self.name, self.files, self.slot, self.num_slots, self.shared = name, files, slot, num_slots, shared
        self.sources = sources
        self.by_file = len(files) >= num_slots
        # Split by record: this slot reads entry slot mod F of each pass's order, with the other slots
        # ≡ slot (mod F); it keeps every `sharers`-th record of it, starting at `share`.
        self.sharers = len(range(slot % len(files), num_slots, len(files)))
        self.share = slot // len(files)
        self.seed, self.list_index, self.skipped = seed, list_index, skipped
        self.pass_no = -1
        self.pass_length: Optional[int] = None  # the most records this slot got in one pass, known after the first
        self.empty: set = set()  # files that gave this slot no record the last time it read them
        self.covered: set = set()  # files read from start to end since the last reset_coverage()
        self._coverage_mark = 0
        self._records_this_pass = 0
        self._records: Iterator[tuple] = iter(())
        self._warned: set = set()  # (path, reason) already logged

    def _pass_records(self, pass_no: int) -> Iterator[tuple]:
        order = np.random.default_rng([self.seed, self.list_index, pass_no]).permutation(len(self.files))
        if self.by_file:
            files = [self.files[i] for i in order[self.slot :: self.num_slots]]
        else:
            files = [self.files[order[self.slot % len(self.files)]]]
        for path in files:
            source, mark, kept = choose_source(path, self.sources), self._coverage_mark, 0
            # Split by record, the file is read once for the slots of this process that share it (SharedReads).
            records = source.read(path) if self.by_file else self.shared.records(self, pass_no, path, source)
            if remote.is_remote(path):  # retries of its reads are counted for this slot (whichever slot reads)
                records = remote.counting_retries(records, self.skipped)
            try:
                for record in records:
                    kept += 1
                    yield source, record
            except remote.RemoteUnreachable as err:  # a remote file still failing after its retries
                self._skip_file("unreachable_file", path, f"cannot be reached ({err}); skipped")
            except FileNotFoundError:  # listed at start-up, gone now (deleted or moved mid-run)
                self._skip_file("missing_file", path, "is missing; skipped")
            except (PermissionError, IsADirectoryError, NotADirectoryError) as err:
                self._skip_file("unreadable_file", path, f"cannot be read ({err}); skipped")
            except (EOFError, OSError, zlib.error) as err:  # truncated or corrupt gzip, I/O error
                self._skip_file("truncated_file", path, f"is truncated or corrupt ({err}); rest of the file skipped")
            (self.empty.add if kept == 0 else self.empty.discard)(path)
            if mark == self._coverage_mark:
                self.covered.add(path)

    def reset_coverage(self) -> None:
        """Start counting the files read through anew (after a usable sample)."""
        self._coverage_mark += 1
        self.covered = set()

    def _skip_file(self, reason: str, path: str, what: str) -> None:
        """Count a file that could not be read in this pass; log it the first time only."""
        self.skipped[reason] += 1
        if (path, reason) not in self._warned:
            self._warned.add((path, reason))
            logger.warning(remote.redact(f"file {path} (listed in {self.name}) {what}; counted as {reason} in "
                                         "every pass it recurs"))

    def next_record(self) -> tuple:
        """The next ``(source, record)``, starting a new pass when this one is done.

        A pass may give this slot nothing (its one file is gone, say); once every listed file has, it raises.
        """
        while True:
            for item in self._records:
                self._records_this_pass += 1
                return item
            if self.pass_no >= 0:
                self.pass_length = max(self.pass_length or 0, self._records_this_pass)
                if self._records_this_pass == 0 and self.empty >= set(self.files):
                    break
            self.pass_no += 1
            self._records_this_pass = 0
            self._records = self._pass_records(self.pass_no)
        file_skips = {r: self.skipped[r] for r in FILE_REASONS if self.skipped[r]}
        raise _NoRecords(remote.redact(
            f"{self.name} gives slot {self.slot} of {self.num_slots} (samples per global batch) no record at all "
            f"(file skips so far: {file_skips}): every listed file is missing, unreadable or empty, or a file has "
            "fewer records than slots read it; add data or use a smaller global batch"))


# ---------------------------------------------------------------------------------------------
# The stream
# ---------------------------------------------------------------------------------------------
MakeSample = Callable[[RecordSource, Any, np.random.Generator], dict]  # raises BadRecord
CheckRecord = Callable[[RecordSource, Any], None]  # raises BadRecord; must decide as MakeSample does


class RecordStream:
    """The draws of every slot over weighted file lists, and their bookkeeping.

    Args:
        lists: ``(name, weight or None, files)`` per ``.filelist``; weights all None (uniform) or all given.
        seed, num_slots: slot j's stream is a function of (seed, j, num_slots, lists).
        shuffle_buffer: undecoded records each slot holds to mix records within files (1 = file order).
        report_every: log a skip summary every this many skipped records.
        max_bad_fraction: raise once more than this fraction of records (after 1000) were bad.
        hint: what to check when nothing is usable (appended to that error).
        sources: the kinds of files the lists may name, chosen by file name (any other name: part files).
    """

    def __init__(self, lists: Sequence[Tuple[str, Optional[float], List[str]]], seed: int, num_slots: int,
                 shuffle_buffer: int = 64, report_every: int = 1000, max_bad_fraction: Optional[float] = None,
                 hint: str = "", sources: Sequence[RecordSource] = (PART_FILES,)):
        if num_slots < 1:
            raise ValueError(f"num_slots must be ≥ 1, got {num_slots}")
        self.lists = list(lists)
        weights = [w for _, w, _ in self.lists]
        self.weights = None if weights[0] is None else np.array(weights, dtype=np.float64) / sum(weights)
        self.seed, self.num_slots = seed, num_slots
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.report_every, self.max_bad_fraction, self.hint = report_every, max_bad_fraction, hint
        self.states: Dict[int, StreamState] = {}  # slot → state, for slots iterated in this process
        self.sources = tuple(sources)

    def layout(self) -> List[str]:
        """Human-readable description of how each list is split over the slots."""
        return [f"{path}: {len(files)} part-file entries, weight {weight}, split by "
                f"{'file' if len(files) >= self.num_slots else 'record within files'} over {self.num_slots} slot(s)"
                for path, weight, files in self.lists]

    def shared_reads(self, slots: Sequence[int]) -> SharedReads:
        """What the streams of ``slots``, iterated together in one process, share: each file read once per pass.

        A slot may lag the others sharing its file by ``shuffle_buffer + 256`` records (kept undecoded,
        like its shuffle buffer) before it reads the rest of that file itself.
        """
        return SharedReads(slots, queue_limit=self.shuffle_buffer + 256)

    def samples(self, slot: int, resume: Optional[ResumePoint], make: MakeSample, check: CheckRecord,
                shared: Optional[SharedReads] = None) -> Iterator[Tuple[dict, int, StreamState]]:
        """Yield ``(sample, pass, state)`` for every usable record of slot ``slot``'s stream.

        ``make(source, record, rng)`` turns a record into a sample (drawing its randomness from
        ``rng`` only); ``check(source, record)`` takes the same usable/skipped decision without
        decoding, for replaying a resumed stream by sample count. Both raise ``BadRecord``.
        ``shared``: the ``shared_reads`` of the slots iterated alongside (default: this slot reads alone);
        the stream is the same either way.
        """
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not in [0, num_slots={self.num_slots})")
        if shared is None:
            shared = self.shared_reads([slot])
        elif slot not in shared.slots:
            raise ValueError(f"slot {slot} is not one of the slots {sorted(shared.slots)} that share reads")
        skip_draws = resume.position if resume is not None else None
        skip_samples = resume.samples_consumed if resume is not None and skip_draws is None else 0
        state = self.states[slot] = StreamState(slot, len(self.lists), skip_draws, skip_samples)
        readers = [_ListReader(path, files, slot, self.num_slots, self.seed, i, state.skipped, shared, self.sources)
                   for i, (path, _, files) in enumerate(self.lists)]
        if slot == 0:
            for r in readers:
                if not r.by_file:
                    logger.info(remote.redact(
                        f"{r.name} has {len(r.files)} part-file entries for {self.num_slots} slots (samples "
                        "per global batch): sharding it by record instead of by file (each slot takes one "
                        "file per pass and keeps its share of the records; a process reads each file once "
                        "for all its slots)"))
        where = f"slot {slot}"
        try:
            for k, epoch, source, record, rng in self._draws(state, readers, where):
                if state.skip_draws is not None and state.position <= state.skip_draws:
                    continue  # exact resume: replay the draw, look at nothing
                replay = state.produced < state.skip_samples  # resume by sample count: check without decoding
                state.examined += 1
                try:
                    sample = None
                    if replay:
                        check(source, record)
                    else:
                        sample = make(source, record, rng)
                except BadRecord as err:
                    self._count_bad(state, readers, k, err.reason, where)
                    continue
                state.produced += 1
                state.bad_since_good = [0] * len(readers)
                for r in readers:
                    r.reset_coverage()
                if sample is not None:
                    yield sample, epoch, state
        finally:
            shared.leave(slot)
            if state.skipped:
                logger.info(f"{where}: stream ended after {state.examined} records, {state.bad} skipped: "
                            f"{dict(state.skipped)}")

    def _draws(self, state: StreamState, readers: List[_ListReader], where: str):
        """Draw after draw: ``(list, pass, source, record, rng of the draw)`` out of the shuffle buffer."""
        choice_rng = np.random.default_rng([self.seed, 0, state.slot, 0])  # draws count from 1
        buffer: List[tuple] = []  # (list index, pass, source, record): undecoded records waiting to be drawn
        weights = self.weights  # None: uniform (kept as None while every list is alive: the same draws)
        summarised = collections.Counter()  # skips at the last pass summary
        while True:
            # One draw: a record of a list (chosen by weight) enters the buffer, a random one leaves.
            k = 0 if len(readers) == 1 else int(choice_rng.choice(len(readers), p=weights))
            reader = readers[k]
            reader_pass = reader.pass_no
            try:
                source, record = reader.next_record()  # may start a new pass
            except _NoRecords as err:  # e.g. all its files vanished mid-run
                state.alive[k] = False
                if not state.alive.any():
                    raise UnusableData(f"{where}: no file list has any record left ({err}); "
                                       f"skipped: {dict(state.skipped)}") from None
                logger.warning(remote.redact(f"{where}: {err}; drawing from the other lists only"))
                weights = np.where(state.alive, self.weights if self.weights is not None else 1.0, 0.0)
                weights /= weights.sum()
                continue
            if reader.pass_no != reader_pass and reader_pass >= 0:
                summarised = self._pass_summary(state, reader, where, summarised)
            buffer.append((k, reader.pass_no, source, record))
            state.position += 1
            if len(buffer) < self.shuffle_buffer:
                continue  # filling up
            rng = np.random.default_rng([self.seed, 0, state.slot, state.position])  # 0: the data's (noise: 1)
            j = int(rng.integers(len(buffer)))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            yield (*buffer.pop(), rng)

    def _pass_summary(self, state: StreamState, reader: _ListReader, where: str,
                      summarised: collections.Counter) -> collections.Counter:
        """Log the skips since the last pass summary when ``reader`` finished a pass; returns the new mark.

        Slot 0 always reports (a progress line per pass); other slots only when they skipped something;
        none while a resumed stream replays.
        """
        if state.replaying:
            return collections.Counter(state.skipped)
        since = state.skipped - summarised
        if since or reader.slot == 0:
            logger.info(remote.redact(
                f"{where}: pass {reader.pass_no - 1} of {reader.name} done ({reader.pass_length} records "
                f"for this slot); skipped since the last summary: {dict(since) or 'none'}, "
                f"in all {state.bad} of {state.examined} records examined"))
        return collections.Counter(state.skipped)

    def _count_bad(self, state: StreamState, readers: List[_ListReader], k: int, reason: str, where: str) -> None:
        """Count one skipped record of list ``k``; report, and fail on too much bad data or none usable."""
        state.skipped[reason] += 1
        state.bad += 1
        state.bad_since_good[k] += 1
        total = sum(state.skipped.values())
        if total - state.reported >= self.report_every:
            state.reported = total
            logger.warning(f"{where}: skipped {state.bad} of {state.examined} records so far: {dict(state.skipped)}")
        if (self.max_bad_fraction is not None and state.examined >= 1000
                and state.bad / state.examined > self.max_bad_fraction):
            raise UnusableData(f"{where}: {state.bad} of {state.examined} records were bad, more than "
                               f"max_bad_fraction={self.max_bad_fraction}: {dict(state.skipped)}")
        # Every file of every list read through, and two of the longest passes (plus the buffer), without a
        # usable sample: fail, never loop.
        if all(not ok or (r.pass_length is not None and n >= 2 * r.pass_length + self.shuffle_buffer
                          and r.covered >= set(r.files))
               for r, n, ok in zip(readers, state.bad_since_good, state.alive)):
            raise UnusableData(remote.redact(
                f"no usable sample in a full pass over {', '.join(r.name for r in readers)} ({where}; "
                f"skipped: {dict(state.skipped)}){'; ' + self.hint if self.hint else ''}"))
