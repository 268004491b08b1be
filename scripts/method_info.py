"""Print a method's sweep settings as shell assignments (read by scripts/common.sh).

    python scripts/method_info.py METHOD DATASET TASK
"""
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import methods  # noqa: E402


def main(argv):
    if len(argv) != 3:
        sys.exit("usage: python scripts/method_info.py METHOD DATASET TASK")
    method, dataset, task = argv
    try:
        s = methods.sweep_settings(method, dataset, task)
    except (ValueError, KeyError) as error:
        sys.exit(f"error: {error}")
    print(f"STEP0_FAMILY={shlex.quote(s['step0_family'])}")
    print(f"STEP0_METHOD={shlex.quote(s['step0_method'])}")
    print(f"DEFAULT_EPOCHS={s['epochs']} DEFAULT_LR0={s['lr0']} DEFAULT_LR={s['lr']}")
    print("METHOD_ARGS=(" + " ".join(shlex.quote(a) for a in s["args"]) + ")")
    print("STEP0_ARGS=(" + " ".join(shlex.quote(a) for a in s["step0_args"]) + ")")


if __name__ == "__main__":
    main(sys.argv[1:])
