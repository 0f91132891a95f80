"""Run the advgkl CLI and SIGKILL this process at an injected point (fault-injection for the tests).

    python killer.py POINT N -- advgkl-cli-args...

POINT is where the kill happens on its N-th occurrence:
  step          after the N-th training forward, before the optimiser update (mid-epoch)
  attack        inside the N-th training-time PGD run
  ckpt_write    while writing the N-th file atomically: temp file written, not yet renamed
  autoattack    during the N-th AutoAttack chunk of the final evaluation
  none          no kill (a plain run)
"""
import os
import signal
import sys


def kill_on(module, name, n):
    original = getattr(module, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(module, name, wrapper)


def main():
    point, n, sep, *argv = sys.argv[1:]
    assert sep == "--"
    n = int(n)
    from advgkl import attacks, checkpoint, cli, trainers

    if point == "step":
        kill_on(trainers, "forward_loss", n)
    elif point == "attack":
        kill_on(attacks.PGD, "_run", n)
    elif point == "ckpt_write":
        kill_on(checkpoint.os, "replace", n)
    elif point == "autoattack":
        kill_on(attacks, "_run_attack", n)
    else:
        assert point == "none", point
    sys.exit(cli.main(argv))


if __name__ == "__main__":
    main()
