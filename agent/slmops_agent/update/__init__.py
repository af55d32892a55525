"""Over-the-air updates: the state machine that fetches, verifies, stages, tests and commits a
package into the inactive slot, or rolls it back.

    messages     the desired state, the report and the blob requests, as plain values
    packages     a package to install: its verified manifest, its files, what the runtime loads
    fetcher      FETCHING: chunked downloads from the fleet, stall repair, re-fetch of a bad blob
    slots        staging into a slot, the `current` link, clean-up of slots, blobs and manifests
    smoke_test   TESTING: the golden prompts within the latency budget
    machine      the Updater: the worker, the states, recovery after a restart

The persisted record and the recovery table are in `slmops_agent.update_record`.
"""
