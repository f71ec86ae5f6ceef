"""The data path: sockets, the shared epoll reactor, flows through kernel pipes, sessions
and plain counters. No task per connection."""
