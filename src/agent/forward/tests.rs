//! Loopback tests of the forwarder with real sockets.
