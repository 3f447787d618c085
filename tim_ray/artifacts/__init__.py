"""What training leaves on disk and everything else reads: checkpoints and exports.

    checksums.py            the checksum manifests that every checkpoint and export carries, and verify()
    checkpoint.py           the DCP checkpoint files: save, read state.json, load weights (safely unpickled index)
    checkpoints_on_disk.py  which checkpoint of a run directory: the newest complete and verified one
    export.py               one-file exports (write, export a checkpoint) and load_for_inference, the one loader

train, eval and tune import from here; this package imports none of them (nor Ray).
"""
