# Sourced by the bench scripts: loopback settings for heavy connection load.
# Each is tried and skipped where the machine does not allow it.

# Loopback load runs out of ephemeral ports quickly: widen the range...
sysctl -qw net.ipv4.ip_local_port_range="1024 65000" 2>/dev/null || true
# ...which then takes in the ports the benches listen on: a connection left
# in TIME_WAIT on one of them makes the next run's bind fail. Keep 19000-19999
# out of the ephemeral range, beside whatever is reserved already.
reserved=$(sysctl -n net.ipv4.ip_local_reserved_ports 2>/dev/null || true)
case ",$reserved," in
  *,19000-19999,*) ;;
  *) sysctl -qw net.ipv4.ip_local_reserved_ports="${reserved:+$reserved,}19000-19999" 2>/dev/null || true ;;
esac
sysctl -qw net.ipv4.tcp_tw_reuse=1 2>/dev/null || true

# A router left running from an earlier run would share the benches'
# addresses through SO_REUSEPORT: the router under test then steers new
# connections to itself and keeps one listening socket per address, and
# what it measures is not what was asked. Refuse to start beside one.
if command -v ss >/dev/null; then
  stale=$(ss -Hltn 'sport >= :18000 and sport <= :19999' 2>/dev/null || true)
  if [ -n "$stale" ]; then
    echo "something already listens on the benches' ports (18000-19999); stop it first:" >&2
    ss -Hltnp 'sport >= :18000 and sport <= :19999' >&2 || true
    exit 1
  fi
fi
