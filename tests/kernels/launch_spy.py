"""A stand-in for a @triton.jit kernel that counts its launches, for tests that check which kernels run."""


class LaunchSpy:
    """Replaces a @triton.jit kernel in its module (monkeypatch) and counts the launches (``kernel[grid](...)``)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]
