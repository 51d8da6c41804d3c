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
