"""Environment for a test's child Python process: it imports the same milora / milora_ext as the
test process. In CI those are the installed packages (the source tree's milora_ext/ has no
compiled _C there, so a child started in the repository root must not find it first); in a
development tree, the in-place build."""
import os


def child_env(*first, **variables):
    """os.environ plus `variables`, with PYTHONPATH = `first` dirs, then where this process's
    milora and milora_ext come from. Start the child outside the source tree (cwd=tmp_path)."""
    import milora
    import milora_ext

    where = sorted({os.path.dirname(os.path.dirname(m.__file__)) for m in (milora, milora_ext)})
    env = dict(os.environ, **variables)
    env["PYTHONPATH"] = os.pathsep.join([*first, *where, env.get("PYTHONPATH", "")])
    return env
