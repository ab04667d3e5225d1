# The configurations of the side-by-side proxy benchmarks (run.sh, instructions.sh), written in
# one place so that every script measures the same setup: one NGINX worker serving two upstream
# ports (B1, B2) as the backend, and each proxy on one worker thread listening on LB, balancing
# the two round robin with keep-alive upstream connections.
#
# Usage: WORK=dir B1=port B2=port LB=port; source bench/proxy/configs.sh;
#        write_configs ["nginx log lines for the backend", default "access_log off;"]
# Writes $WORK/backend.conf, haproxy.cfg, nginx.conf and fulcrum.toml.

write_configs() {
  local backend_log=${1:-"access_log off;"}
  cat > "$WORK/backend.conf" <<CONF
worker_processes 1;
daemon off;
pid $WORK/backend.pid;
error_log $WORK/backend-error.log warn;
events { worker_connections 4096; }
http {
  $backend_log
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$B1; location / { return 200 "hello from b1\n"; } }
  server { listen 127.0.0.1:$B2; location / { return 200 "hello from b2\n"; } }
}
CONF

  cat > "$WORK/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend fe
  bind 127.0.0.1:$LB
  default_backend be
backend be
  balance roundrobin
  server b1 127.0.0.1:$B1
  server b2 127.0.0.1:$B2
CONF

  cat > "$WORK/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream be { server 127.0.0.1:$B1; server 127.0.0.1:$B2; keepalive 512; }
  server {
    listen 127.0.0.1:$LB;
    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF

  cat > "$WORK/fulcrum.toml" <<CONF
[proxy]
workers = 1
[[listener]]
name = "public"
address = "127.0.0.1:$LB"
pool = "be"
[pool.be]
policy = "round_robin"
max_idle_per_endpoint = 512
endpoints = [{ address = "127.0.0.1:$B1" }, { address = "127.0.0.1:$B2" }]
CONF
}
