"""A robot control loop on `vlatune.serving.PolicyClient`, with a LIBERO environment standing in
for the robot: one episode, the policy served by `vlatune serve` (in another process, or on
another machine).

The loop is what a real robot runs: read the cameras and the state, send them with the
instruction, execute the first `--replan` actions of the returned chunk, repeat. The observation
is in vlatune's conventions (upright uint8 images per camera, 8-d state, instruction); actions
come back in the env convention (delta end-effector pose, gripper -1 open / +1 close).

    $ vlatune serve runs/x/checkpoint-2000 &
    $ .venv/bin/python examples/robot_client.py --url ws://127.0.0.1:8000 --task 0 --init 0
"""

from __future__ import annotations

import argparse
import time

from vlatune.serving import PolicyClient
from vlatune.sim.env import LiberoEnv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="ws://127.0.0.1:8000")
    ap.add_argument("--suite", default="libero_object")
    ap.add_argument("--task", type=int, default=0)
    ap.add_argument("--init", type=int, default=0, help="LIBERO fixed initial state (0-49).")
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--replan", type=int, default=8, help="Actions executed per chunk.")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=30.0, help="Seconds to wait for an answer.")
    args = ap.parse_args()

    client = PolicyClient(args.url, timeout=args.timeout)
    conv = client.conventions
    print(f"policy: {client.description.get('policy')} at {args.url}; conventions: {conv}")
    cameras = tuple(conv.get("cameras") or ("agentview", "wrist"))
    env = LiberoEnv(args.suite, args.task, resolution=args.resolution, cameras=cameras)
    try:
        obs = env.reset(args.init)
        # init_state lets a replay policy find its demo; a learned policy ignores it
        client.reset(
            instruction=env.instruction,
            suite=env.suite,
            task_id=args.task,
            init_index=args.init,
            init_state=env.init_states[args.init],
        )
        max_steps = args.max_steps or env.max_steps
        steps, success, t0 = 0, False, time.perf_counter()
        while steps < max_steps and not success:
            chunk = client.predict(obs)  # {"images": {cam: uint8 HxWx3}, "state", "instruction"}
            for action in chunk[: args.replan]:
                obs, success, _ = env.step(action)
                steps += 1
                if success or steps >= max_steps:
                    break
        wall = time.perf_counter() - t0
        print(
            f"{'success' if success else 'failure'} after {steps} steps ({wall:.1f} s); "
            f"server: {client.stats()}"
        )
    finally:
        env.close()
        client.close()


if __name__ == "__main__":
    main()
