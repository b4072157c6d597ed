"""Test kit: a simulated NPU node (``simnode``) and a kubelet emulator (``kubelet``)."""
