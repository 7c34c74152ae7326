"""A loop's real epoll with each interest change recorded (what ``epoll_ctl`` sees): tests swap it
in as ``loop._epoll`` and put ``.real`` back when done."""

from __future__ import annotations


class CountingEpoll:
    def __init__(self, real):
        self.real, self.ops = real, []

    def register(self, fd, mask):
        self.ops.append(("add", fd, mask))
        return self.real.register(fd, mask)

    def modify(self, fd, mask):
        self.ops.append(("mod", fd, mask))
        return self.real.modify(fd, mask)

    def unregister(self, fd):
        self.ops.append(("del", fd))
        return self.real.unregister(fd)

    def __getattr__(self, name):
        return getattr(self.real, name)
