"""`make e2e`: a real single-node Kubernetes cluster around the agent.

cluster.py brings a node up and down (every change it makes to the host is
recorded in a state file first, so `down` can undo what a killed run left),
npus.py simulates NPUs on the host, transcript.py prints each step with its
duration and the measured figures, run.py is what `make e2e` runs.
"""
