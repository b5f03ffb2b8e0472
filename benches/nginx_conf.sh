# nginx doing the job balancer does, for the benchmarks that compare them (sourced by
# load.sh and instructions.sh): keep-alive to the backend, and the header work SPEC asks
# of balancer.
#
#   nginx_conf DIR WORKERS PORT BACKEND_PORT [EXTRA [HTTP_EXTRA [LOCATION_EXTRA]]]
#                                                    # writes DIR/nginx.conf
#
# EXTRA: more top-level directives (instructions.sh runs nginx in one process under
# valgrind); HTTP_EXTRA and LOCATION_EXTRA: more in `http` and in `location /` (cache.sh
# adds proxy_cache there).
nginx_conf() {
  local dir=$1 workers=$2 port=$3 backend=$4 extra=${5:-} http_extra=${6:-} location_extra=${7:-}
  mkdir -p "$dir"
  cat > "$dir/nginx.conf" <<CFG
worker_processes $workers;
$extra
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 20000; }
http {
  access_log off;
  upstream app { server 127.0.0.1:$backend; keepalive 256; }
  $http_extra
  # The client's Host, X-Forwarded-*, and a request id kept from the client or made, sent
  # to the backend and returned to the client.
  map \$http_x_request_id \$rid { default \$http_x_request_id; "" \$request_id; }
  server {
    listen 127.0.0.1:$port backlog=1024;
    keepalive_requests 1000000;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$http_host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_set_header X-Forwarded-Host \$http_host;
      proxy_set_header X-Request-Id \$rid;
      add_header X-Request-Id \$rid always;
      $location_extra
    }
  }
}
CFG
}
