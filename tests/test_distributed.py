import numpy as np

from trainer.distributed import gpu_for_local_rank, threads_per_rank, weights_digest


def test_cores_are_split_between_local_ranks():
    assert threads_per_rank(local_size=2, cpus=2) == 1
    assert threads_per_rank(local_size=1, cpus=2) == 2
    assert threads_per_rank(local_size=4, cpus=64) == 16
    assert threads_per_rank(local_size=8, cpus=2) == 1  # never 0


def test_each_local_rank_gets_its_own_gpu():
    gpus = ["/gpu:0", "/gpu:1", "/gpu:2", "/gpu:3"]
    assert [gpu_for_local_rank(gpus, r) for r in range(4)] == gpus
    assert gpu_for_local_rank(gpus[:2], 3) == "/gpu:1"


class _Var:
    def __init__(self, value):
        self.value = np.asarray(value)

    def numpy(self):
        return self.value


def test_weights_digest_sees_any_change():
    a = [_Var(np.ones((2, 2), np.float32)), _Var(np.zeros(3, np.float32))]
    b = [_Var(np.ones((2, 2), np.float32)), _Var(np.zeros(3, np.float32))]
    assert weights_digest(a) == weights_digest(b)
    b[1].value[2] = np.float32(1e-30)
    assert weights_digest(a) != weights_digest(b)

