"""--rollout.engine_cores follow: the trainer's thread count follows the engine's busy flag at every block of its
models, in the forward and in the backward (which the autograd engine runs on the calling thread on the CPU)."""
import torch

from engine.trainers.follow_threads import FollowEngine


class Seen(torch.autograd.Function):
    """Identity that records the thread count in the forward and in the backward."""

    @staticmethod
    def forward(ctx, x, log, name):
        ctx.log, ctx.name = log, name
        log.append((name, "forward", torch.get_num_threads()))
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        ctx.log.append((ctx.name, "backward", torch.get_num_threads()))
        return g, None, None


class Block(torch.nn.Module):
    def __init__(self, name, log, flip=None):
        super().__init__()
        self.lin, self.name, self.log, self.flip = torch.nn.Linear(5, 5), name, log, flip

    def forward(self, x):
        if self.flip:
            self.flip("forward")
        y = Seen.apply(torch.tanh(self.lin(x)), self.log, self.name)
        return y if not self.flip else Flip.apply(y, self.flip)


class Flip(torch.autograd.Function):
    """Identity whose backward calls flip("backward"): the engine's state changing during the backward."""

    @staticmethod
    def forward(ctx, x, flip):
        ctx.flip = flip
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        ctx.flip("backward")
        return g, None


class Net(torch.nn.Module):
    def __init__(self, log, flips):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(i, log, flips.get(i)) for i in range(3))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_threads_follow_the_engine_block_by_block_forward_and_backward():
    before = torch.get_num_threads()
    busy = torch.ones(1, dtype=torch.int32)
    log = []

    def flip(when):  # the engine finishes during block 1's forward, starts again during block 2's backward
        busy[0] = 0 if when == "forward" else 1

    net = Net(log, {1: flip})
    torch.set_num_threads(2)
    follow = FollowEngine(busy, alone=3, beside=1)
    follow.attach(net, None)
    try:
        net(torch.randn(4, 5, requires_grad=True)).sum().backward()
    finally:
        follow.detach()
        torch.set_num_threads(before)
    # block 1 entered while the engine generated (1 thread); block 2 after it finished (3); the backward starts
    # with the engine idle (3) and block 1's backward (the flip) makes it busy: block 0's backward on 1 thread.
    # Block 1's own backward had already been entered at 3 threads.
    assert log == [(0, "forward", 1), (1, "forward", 1), (2, "forward", 3),
                   (2, "backward", 3), (1, "backward", 3), (0, "backward", 1)]
    assert follow.switches == 3  # 2 -> 1 at the start, 1 -> 3 at block 2, 3 -> 1 at block 0's backward
    assert not follow.handles


def test_detached_it_no_longer_changes_threads():
    before = torch.get_num_threads()
    busy = torch.zeros(1, dtype=torch.int32)
    log = []
    net = Net(log, {})
    follow = FollowEngine(busy, alone=before + 1, beside=1)
    follow.attach(net)
    follow.detach()
    net(torch.randn(2, 5)).sum()
    assert [n for *_, n in log] == [before] * 3 and follow.switches == 0
