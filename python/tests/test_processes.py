"""Exclusion across processes: a counter in a file, kept by processes that
each take the lock for every increment, and the tokens they got."""

import multiprocessing

import pytest

import distlock

ROUNDS = 25
WORKERS = 4


def _work(url, key, path):
    with distlock.connect(url).session(ttl=10) as session:
        for _ in range(ROUNDS):
            with session.lock(key, wait=60) as guard:
                with open(path) as file:
                    lines = file.read().split()
                count, last = int(lines[0]), int(lines[1]) if len(lines) > 1 else 0
                with open(path, "w") as file:
                    # The read-modify-write the lock protects; a second
                    # holder in between would lose an increment.
                    file.write(f"{count + 1} {guard.token}\n")
                with open(path + ".tokens", "a") as file:
                    file.write(f"{last} {guard.token}\n")


def test_processes_take_turns_with_rising_tokens(url, key, tmp_path):
    if url.startswith("memory://"):
        pytest.skip("memory:// is one process's")
    path = str(tmp_path / "counter")
    with open(path, "w") as file:
        file.write("0\n")
    # A forked child must not use its parent's runtime: spawn.
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_work, args=(url, key, path)) for _ in range(WORKERS)]
    for worker in workers:
        worker.start()
    try:
        for worker in workers:
            worker.join(120)
            assert worker.exitcode == 0
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
    with open(path) as file:
        assert int(file.read().split()[0]) == ROUNDS * WORKERS
    with open(path + ".tokens") as file:
        pairs = [tuple(map(int, line.split())) for line in file]
    assert len(pairs) == ROUNDS * WORKERS
    # Each holder saw the token its predecessor wrote, and got a higher one.
    for (_, before), (seen, after) in zip(pairs, pairs[1:]):
        assert seen == before and after > before


def _use_after_fork(queue):
    try:
        distlock.connect("memory://child")
        queue.put("no error")
    except RuntimeError as err:
        queue.put(str(err))


def test_a_forked_child_of_a_user_is_told_to_spawn():
    distlock.connect("memory://parent").session().close()
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_use_after_fork, args=(queue,))
    child.start()
    try:
        said = queue.get(timeout=30)
    finally:
        child.join(5)
        child.kill()
    assert "'spawn'" in said, said
