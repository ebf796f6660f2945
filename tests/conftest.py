"""Test-session environment: offline, and a cache folder of its own.

Run-time builds (tiny models, the converted SmolLM2, tokenized data) go to a fresh temporary
cache per test session, so tests never read or write the user's cache. Set
RLHFKIT_TEST_CACHE to a folder to reuse builds across sessions while developing."""
import os
import random
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# pytest-xdist's workers (pytest.ini runs 2) inherit the environment the controller sets here, so
# they share its cache (builds take a file lock) and its matrix seed (both must collect the same
# tests); only the controller, or a run without workers, picks them.
if "PYTEST_XDIST_WORKER" not in os.environ:
    os.environ["RLHFKIT_CACHE"] = os.environ.get("RLHFKIT_TEST_CACHE") or tempfile.mkdtemp(prefix="rlhfkit-test-")
    # tests/test_matrix.py draws its combinations from this seed: a fresh one per session unless
    # given, so CI covers new combinations over time. The kill tests' kill points come from
    # RLHFKIT_KILL_SEED instead (tests/helpers.py session_rng), fixed unless given.
    os.environ.setdefault("RLHFKIT_MATRIX_SEED", str(random.SystemRandom().randrange(10**6)))


def pytest_configure(config):
    """Workers split the cores: without this each worker's (and each launched rank's) OpenMP pool
    takes every core and they fight over them."""
    workers = getattr(config.option, "numprocesses", None) or 0
    if "PYTEST_XDIST_WORKER" not in os.environ and workers > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))


def pytest_report_header(config):
    return (f"Step 3 matrix: RLHFKIT_MATRIX_SEED={os.environ['RLHFKIT_MATRIX_SEED']} (set it to rerun those "
            f"combinations); kill points: RLHFKIT_KILL_SEED={os.environ.get('RLHFKIT_KILL_SEED', '0')}")
