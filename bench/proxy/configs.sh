# The configurations of the side-by-side proxy benchmarks (run.sh, instructions.sh), written in
# one place so that every script measures the same setup: one NGINX worker serving two upstream
# ports (B1, B2) as the backend, and each proxy on one worker thread listening on LB, balancing
# the two round robin with keep-alive upstream connections.
#
# Usage: WORK=dir B1=port B2=port LB=port [TLS=1]; source bench/proxy/configs.sh;
#        write_configs ["nginx log lines for the backend", default "access_log off;"]
# Writes $WORK/backend.conf, haproxy.cfg, nginx.conf and fulcrum.toml. With TLS=1 each proxy
# terminates TLS on LB (one ECDSA P-256 certificate for 127.0.0.1, made with openssl; ALPN
# http/1.1; TLS 1.3 with each proxy's default ciphers), the upstreams staying plain HTTP.

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

  if [ "${TLS:-0}" = 1 ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
      -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
      -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
    cat "$WORK/cert.pem" "$WORK/key.pem" > "$WORK/haproxy.pem"
    sed -i "s|  bind 127.0.0.1:$LB|  bind 127.0.0.1:$LB ssl crt $WORK/haproxy.pem alpn http/1.1|" "$WORK/haproxy.cfg"
    sed -i "s|    listen 127.0.0.1:$LB;|    listen 127.0.0.1:$LB ssl; ssl_certificate $WORK/cert.pem; ssl_certificate_key $WORK/key.pem; ssl_protocols TLSv1.2 TLSv1.3;|" "$WORK/nginx.conf"
    sed -i "s|^pool = \"be\"|pool = \"be\"\ntls = { cert = \"$WORK/cert.pem\", key = \"$WORK/key.pem\" }|" "$WORK/fulcrum.toml"
  fi
}
