// Command pq-interop speaks TLS 1.3 with X25519MLKEM768 as its only key exchange, as Go's
// crypto/tls implements it, so that the proxy's own X25519MLKEM768 is checked against another
// implementation of the draft, in both roles. One connection: four bytes are echoed, and the
// key exchange used is printed.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
)

func main() {
	mode := flag.String("mode", "", "client (dial -addr, trusting -ca) or server (print the address, serve -cert and -key)")
	addr := flag.String("addr", "127.0.0.1:0", "where to dial, or listen")
	ca := flag.String("ca", "", "PEM file of the certificate the client trusts")
	cert := flag.String("cert", "", "PEM file of the server's certificate")
	key := flag.String("key", "", "PEM file of the server's key")
	flag.Parse()
	config := &tls.Config{
		MinVersion:       tls.VersionTLS13,
		CurvePreferences: []tls.CurveID{tls.X25519MLKEM768},
	}
	switch *mode {
	case "client":
		pem, err := os.ReadFile(*ca)
		check(err)
		config.RootCAs = x509.NewCertPool()
		if !config.RootCAs.AppendCertsFromPEM(pem) {
			log.Fatalf("no certificate in %s", *ca)
		}
		config.ServerName = "localhost"
		conn, err := tls.Dial("tcp", *addr, config)
		check(err)
		_, err = conn.Write([]byte("ping"))
		check(err)
		echo := make([]byte, 4)
		_, err = io.ReadFull(conn, echo)
		check(err)
		fmt.Printf("%s %s\n", conn.ConnectionState().CurveID, echo)
	case "server":
		pair, err := tls.LoadX509KeyPair(*cert, *key)
		check(err)
		config.Certificates = []tls.Certificate{pair}
		listener, err := tls.Listen("tcp", *addr, config)
		check(err)
		fmt.Println(listener.Addr())
		conn, err := listener.Accept()
		check(err)
		tlsConn := conn.(*tls.Conn)
		received := make([]byte, 4)
		_, err = io.ReadFull(tlsConn, received)
		check(err)
		_, err = tlsConn.Write(received)
		check(err)
		check(tlsConn.Close())
		fmt.Printf("%s %s\n", tlsConn.ConnectionState().CurveID, received)
	default:
		log.Fatalf("-mode is client or server, not %q", *mode)
	}
}

func check(err error) {
	if err != nil {
		log.Fatal(err)
	}
}
