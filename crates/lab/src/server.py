# The lab's workload: listens on the TCP and UDP ports given as arguments (tcp:PORT, udp:PORT)
# on every address of its network namespace. TCP: a request that starts like HTTP gets
# "200 OK" and the connection closes; anything else is echoed back for as long as the peer
# keeps the connection open. UDP: datagrams are echoed.
import socket, struct, sys, threading

METHODS = (b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"PATC", b"OPTI", b"CONN", b"TRAC")

def tcp_conn(c):
    try:
        c.settimeout(600)
        first = c.recv(65536)
        if first[:4] in METHODS:
            while b"\r\n\r\n" not in first and len(first) < 65536:
                more = c.recv(65536)
                if not more:
                    break
                first += more
            body = b"ok\n"
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            return
        while first:
            c.sendall(first)
            first = c.recv(65536)
    except OSError:
        pass
    finally:
        c.close()

def tcp_socket(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(128)
    return s

def udp_socket(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    return s

def tcp(s):
    while True:
        c, _ = s.accept()
        threading.Thread(target=tcp_conn, args=(c,), daemon=True).start()

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)

def udp(s):
    # Answer from the address the datagram was sent to (the world holds many addresses on
    # one namespace; the route's source would be the wrong one).
    s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    while True:
        data, anc, _, peer = s.recvmsg(65536, 256)
        reply_from = None
        for level, kind, cdata in anc:
            if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(cdata) >= 12:
                reply_from = cdata[8:12]
        try:
            if reply_from is None:
                s.sendto(data, peer)
            else:
                info = struct.pack("=I4s4s", 0, reply_from, bytes(4))
                s.sendmsg([data], [(socket.IPPROTO_IP, IP_PKTINFO, info)], 0, peer)
        except OSError:
            pass

# Bind everything first so that "listening" means every port is ready.
bound = []
for arg in sys.argv[1:]:
    proto, _, port = arg.partition(":")
    if proto == "tcp":
        bound.append((tcp, tcp_socket(int(port))))
    else:
        bound.append((udp, udp_socket(int(port))))
threads = []
for fn, s in bound:
    t = threading.Thread(target=fn, args=(s,), daemon=True)
    t.start()
    threads.append(t)
print("listening", " ".join(sys.argv[1:]), flush=True)
for t in threads:
    t.join()
threading.Event().wait()
