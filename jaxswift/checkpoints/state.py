"""Train-state checkpoints with orbax: atomic (written to a temporary folder, committed by rename), pruned to
`save_total_limit`, restorable into any mesh (shardings come from the template state passed in)."""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxswift.errors import CheckpointError

CHECKPOINT_DIR = "checkpoints"


def _state_tree(state) -> dict:
    # The frozen base is not saved: it is reloaded from the model source (one copy, and small checkpoints for LoRA).
    return {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state, "rng": state.rng,
            "skipped_steps": state.skipped_steps, "bad_streak": state.bad_streak}


class StateCheckpointer:
    def __init__(self, output_dir: str | Path, save_total_limit: int | None = None):
        self.dir = Path(output_dir).absolute() / CHECKPOINT_DIR
        options = ocp.CheckpointManagerOptions(max_to_keep=save_total_limit or None, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.dir, options=options)

    def save(self, state, meta: dict) -> Path:
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return self.dir / str(step)
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_state_tree(state)),
                                                        meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()
        return self.dir / str(step)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def close(self):
        self.manager.close()


def resolve_resume(value: str, output_dir: str | Path) -> tuple[Path, int]:
    """`--resume_from_checkpoint latest|DIR` -> (checkpoints folder, step)."""
    if value == "latest":
        root = Path(output_dir).absolute() / CHECKPOINT_DIR
        steps = ocp.utils.checkpoint_steps(root) if root.is_dir() else []
        if not steps:
            raise CheckpointError(f"--resume_from_checkpoint latest: no checkpoint in {root}")
        return root, max(steps)
    path = Path(value).absolute()
    if path.is_dir() and path.name.isdigit() and (path / "state").is_dir():
        return path.parent, int(path.name)
    if path.is_dir() and path.name == CHECKPOINT_DIR:
        steps = ocp.utils.checkpoint_steps(path)
        if steps:
            return path, max(steps)
    if path.is_dir() and (path / CHECKPOINT_DIR).is_dir():
        return resolve_resume("latest", path)
    raise CheckpointError(f"--resume_from_checkpoint {value}: not a checkpoint folder (expected "
                          f"OUTPUT_DIR, OUTPUT_DIR/checkpoints or OUTPUT_DIR/checkpoints/STEP)")


def restore_state(root: Path, step: int, template_state):
    """(state, meta): the saved parts restored into the shapes and shardings of `template_state` (a freshly
    initialized state, whose frozen base is kept)."""
    manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(create=False))
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_tree(template_state))
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                 meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types; the user needs the folder and the cause
        raise CheckpointError(f"{root / str(step)}: cannot restore ({type(e).__name__}: {str(e).splitlines()[0]})") \
            from None
    finally:
        manager.close()
    tree = restored.state
    state = template_state.replace(step=tree["step"], trainable=tree["trainable"], opt_state=tree["opt_state"],
                                   rng=tree["rng"], skipped_steps=tree["skipped_steps"], bad_streak=tree["bad_streak"])
    return state, dict(restored.meta)
