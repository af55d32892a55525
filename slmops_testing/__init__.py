"""What the tests and the benchmarks share (not installed on devices, not used by the programs):

- `brokers`: a Mosquitto 2 of the tests' own (dynamic security, persistence) and a TCP relay that
  corrupts a chunk on the wire.
- `packages`: signed package folders of given files, and an existing package signed again.
- `tiny_model`: the tests' tiny Llama as a Hugging Face folder.
- `free_text_task`: a free-text task (the city a sentence names) for distillation on text answers.
- `simulated_devices`: a device as the fleet sees it (a real paho client) and the ACL probe.
- `swarm`: many lean simulated devices per thread (benchmarks/fleet_bench.py).
- `processes`: handles on real `slmops fleet serve` and `slmops agent run` processes.
- `attacks`: a watch on the fleet's memory and /healthz during an attack; an oversized raw MQTT PUBLISH.
- `crash`: a restartable agent process and packages whose transfer spans many chunks (crash tests).
"""
