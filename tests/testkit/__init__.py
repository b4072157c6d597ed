"""Tests of the test kit: SimNode and KubeletEmulator."""
