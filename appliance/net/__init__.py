"""The network: our upper-layer acceptor and Storage SCP, and the SCU that sends."""
