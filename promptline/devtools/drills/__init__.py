"""`make drills`: fault drills on a real local deployment (each service its own process, a real
Redis, the simulated model and a fake OpenAI-compatible upstream), one row per drill: what was
done, what the contract expects, what was observed, pass or fail. `make test` runs the smoke
version of each (`Scale(smoke=True)`) and shows that a planted fault (`faults.py`) fails it.
"""
