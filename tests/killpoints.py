"""The kill point that test_killed_client's and test_killed_node's child processes share, as
source text for their ``python -c`` scripts (a child imports nothing from tests/): a patched
`shm.Directory.write` that SIGKILLs its process before the ``at``-th counted shared-memory file
is written (phase ``"before"``), or once it is written and before its descriptor leaves (phase
``"written"``: a file no one was told of). The script defines ``at``, ``phase`` and
``counted(counter)`` (which writes count) first, and imports ``os``, ``signal`` and ``shm``."""

DYING_WRITE = """
written = 0
write = shm.Directory.write

def dying_write(self, name_tag, counter, *args, **kwargs):
    global written
    written += counted(counter)
    if written == at and phase == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    made = write(self, name_tag, counter, *args, **kwargs)
    if written == at and phase == "written":
        os.kill(os.getpid(), signal.SIGKILL)
    return made
"""
